"""LLaVA's ``forward`` under new ``generate()`` and the MoE load-balancing loss of a trained tower.

transformers 4.57+ ``generate()`` passes ``cache_position`` (and 5.x more keyword arguments) that
LLaVA's ``forward`` does not accept; they are dropped, which lets the language model recompute them.
When the CLIP-MoE tower is trainable, ``coef * aux_loss`` of the tower's last call is added to the loss.
"""

import functools
import inspect
from typing import Any, Callable

from llava_patch.patching import set_attribute, wrap
from mllm_encoder.vision_tower import CLIPMoEVisionTower


def _wrap_forward(original: Callable) -> Callable:
    accepted = set(inspect.signature(original).parameters)

    @functools.wraps(original)
    def forward(self, *args: Any, **kwargs: Any):
        kwargs = {key: value for key, value in kwargs.items() if key in accepted}
        tower = self.get_vision_tower()
        if isinstance(tower, CLIPMoEVisionTower):
            tower.last_aux_loss = None
        outputs = original(self, *args, **kwargs)
        # LLaVA's forward runs the tower and computes the loss inside one call and offers no hook between them,
        # so the tower's aux loss of this call is read from the state it left (CLIPMoEVisionTower.last_aux_loss).
        aux_loss = tower.last_aux_loss if isinstance(tower, CLIPMoEVisionTower) else None
        if aux_loss is None:
            return outputs
        if isinstance(outputs, tuple):  # return_dict=False: the loss, when present, is the leading scalar
            has_loss = outputs and outputs[0].dim() == 0
            return (outputs[0] + aux_loss.to(outputs[0]),) + outputs[1:] if has_loss else outputs
        if outputs.loss is not None:
            outputs.loss = outputs.loss + aux_loss.to(outputs.loss)
        return outputs

    return forward


def apply() -> None:
    """Wrap ``forward`` of LLaVA's Llama and Mistral models."""
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM
    from llava.model.language_model.llava_mistral import LlavaMistralForCausalLM

    for model_cls in (LlavaLlamaForCausalLM, LlavaMistralForCausalLM):
        wrap(model_cls, "forward", _wrap_forward)
        # The loss is a plain mean: the Trainer must scale it for gradient accumulation itself.
        set_attribute(model_cls, "accepts_loss_kwargs", False)
