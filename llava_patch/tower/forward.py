"""LLaVA's ``forward`` under new ``generate()`` and the MoE load-balancing loss of a trained tower.

transformers 4.57+ ``generate()`` passes ``cache_position`` (and 5.x more keyword arguments) that
LLaVA's ``forward`` does not accept; they are dropped, which lets the language model recompute them.
With a CLIP-MoE tower, the tower's load-balancing loss is added to the loss by the tower's
:class:`llava_patch.aux_loss.TowerAuxLoss` (the definition is there): LLaVA's model runs the tower and computes
its loss inside one call, so the hook on the tower's encoder collects during that call and the term is added to
what it returns.
"""

import functools
import inspect
from typing import Any, Callable

from llava_patch.patching import set_attribute, wrap
from llava_patch.tower.registry import LlavaCLIPMoEVisionTower


def _wrap_forward(original: Callable) -> Callable:
    accepted = set(inspect.signature(original).parameters)

    @functools.wraps(original)
    def forward(self, *args: Any, **kwargs: Any):
        kwargs = {key: value for key, value in kwargs.items() if key in accepted}
        tower = self.get_vision_tower()
        if not isinstance(tower, LlavaCLIPMoEVisionTower):
            return original(self, *args, **kwargs)
        tower.aux_loss_hook.start()
        return tower.aux_loss_hook.add_to(original(self, *args, **kwargs))

    return forward


def apply() -> None:
    """Wrap ``forward`` of LLaVA's Llama and Mistral models."""
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM
    from llava.model.language_model.llava_mistral import LlavaMistralForCausalLM

    for model_cls in (LlavaLlamaForCausalLM, LlavaMistralForCausalLM):
        wrap(model_cls, "forward", _wrap_forward)
        # The loss is a plain mean: the Trainer must scale it for gradient accumulation itself.
        set_attribute(model_cls, "accepts_loss_kwargs", False)
