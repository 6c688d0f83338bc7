"""CLIP-MoE settings in the saved LLaVA config, and ``--unfreeze_mm_vision_tower`` for LLaVA-1.5 training.

LLaVA only keeps ``mm_*`` keys of the tower in its config. After ``initialize_vision_modules`` the tower's full
vision config, image processor and MoE summary (``mm_vision_config``, ``mm_vision_image_processor``,
``mm_vision_num_experts``, ``mm_vision_top_k``, ``mm_vision_moe_layers``, ``mm_vision_router_aux_loss_coef``)
are written there, so a trained model rebuilds its tower without the original checkpoint directory.
"""

import dataclasses
import functools
from typing import Any, Callable

from llava_patch.patching import wrap
from mllm_encoder.vision_tower import CLIPMoEVisionTower


def _extend_model_arguments(model_arguments: type) -> type:
    extended = dataclasses.make_dataclass(
        "ModelArguments",
        [
            (
                "unfreeze_mm_vision_tower",
                bool,
                dataclasses.field(
                    default=False,
                    metadata={"help": "Train the CLIP-MoE vision tower (its MoE load-balancing loss is added)."},
                ),
            )
        ],
        bases=(model_arguments,),
    )
    extended.__module__ = model_arguments.__module__
    return extended


def _wrap_initialize_vision_modules(original: Callable) -> Callable:
    @functools.wraps(original)
    def initialize_vision_modules(self, model_args: Any, fsdp: Any = None) -> None:
        original(self, model_args, fsdp=fsdp)
        tower = self.get_vision_tower()
        if isinstance(tower, CLIPMoEVisionTower):
            # A tower restored from a LLaVA checkpoint was built frozen: follow this run's flag.
            tower.unfreeze = bool(getattr(model_args, "unfreeze_mm_vision_tower", False))
            tower.reset_trainable()
            for key, value in tower.export_llava_config().items():
                setattr(self.config, key, value)

    return initialize_vision_modules


def apply() -> None:
    """Patch ``LlavaMetaModel.initialize_vision_modules`` and ``llava.train.train.ModelArguments``."""
    import llava.train.train as train_module
    from llava.model.llava_arch import LlavaMetaModel

    wrap(LlavaMetaModel, "initialize_vision_modules", _wrap_initialize_vision_modules)
    wrap(train_module, "ModelArguments", _extend_model_arguments)
