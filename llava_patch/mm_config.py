"""CLIP-MoE settings in the saved LLaVA config, and ``--unfreeze_mm_vision_tower`` for LLaVA-1.5 training.

LLaVA only keeps ``mm_*`` keys of the tower in its config. After ``initialize_vision_modules`` the tower's full
vision config, image processor and MoE summary (``mm_vision_config``, ``mm_vision_image_processor``,
``mm_vision_num_experts``, ``mm_vision_top_k``, ``mm_vision_moe_layers``, ``mm_vision_router_aux_loss_coef``)
are written there, so a trained model rebuilds its tower without the original checkpoint directory.
"""

import dataclasses
import functools
from typing import Any

from mllm_encoder.vision_tower import CLIPMoEVisionTower


def _extend_model_arguments(train_module: Any) -> None:
    model_arguments = train_module.ModelArguments
    if any(f.name == "unfreeze_mm_vision_tower" for f in dataclasses.fields(model_arguments)):
        return
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
    train_module.ModelArguments = extended


def _wrap_initialize_vision_modules(meta_model_cls: type) -> None:
    original = meta_model_cls.initialize_vision_modules
    if getattr(original, "_llava_patch", False):
        return

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

    initialize_vision_modules._llava_patch = True
    meta_model_cls.initialize_vision_modules = initialize_vision_modules


def apply() -> None:
    """Patch ``LlavaMetaModel.initialize_vision_modules`` and ``llava.train.train.ModelArguments``."""
    import llava.train.train as train_module
    from llava.model.llava_arch import LlavaMetaModel

    _wrap_initialize_vision_modules(LlavaMetaModel)
    _extend_model_arguments(train_module)
