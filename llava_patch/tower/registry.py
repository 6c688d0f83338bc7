"""Vision-tower names for LLaVA: ``clip-moe``, ``clip-moe:<dir>`` and CLIP-MoE checkpoint directories.

``clip-moe`` is the default CLIP-MoE checkpoint: the directory in the ``CLIP_MOE_PATH`` environment variable,
else ``$XDG_CACHE_HOME/clip-moe/default`` (``~/.cache/clip-moe/default``). Every other name goes to LLaVA's own
builder. LLaVA's ``llava_arch`` imports ``build_vision_tower`` by name, so both references are replaced.
The towers are :class:`LlavaCLIPMoEVisionTower`: the library tower with weights loaded ZeRO-3-safely.
"""

import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from llava_patch.aux_loss import TowerAuxLoss
from llava_patch.patching import set_attribute, wrap
from llava_patch.tower.zero3 import load_state_dict_zero3_safe
from mllm_encoder.checkpoint import is_clip_moe_dir
from mllm_encoder.vision_tower import CLIPMoEVisionTower

DEFAULT_NAME = "clip-moe"
PREFIX = "clip-moe:"
ENV_VAR = "CLIP_MOE_PATH"


class LlavaCLIPMoEVisionTower(CLIPMoEVisionTower):
    """The CLIP-MoE tower inside LLaVA: its encoder weights load into DeepSpeed ZeRO-3 partitions too, and
    ``aux_loss_hook`` (installed once, so a compiled encoder keeps its graph) collects the encoder's load-balancing
    loss for the patched ``forward`` (:mod:`llava_patch.tower.forward`)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.aux_loss_hook = TowerAuxLoss(None, self.vision_tower)

    def load_encoder_state(self, state_dict: Dict[str, torch.Tensor]) -> None:
        load_state_dict_zero3_safe(self.vision_tower, state_dict)


def default_checkpoint_dir() -> Path:
    """Where ``--vision_tower clip-moe`` looks: ``$CLIP_MOE_PATH`` or the cache directory."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser()
    return cache / "clip-moe" / "default"


def _missing_default_error(path: Path) -> ValueError:
    return ValueError(
        f"--vision_tower {DEFAULT_NAME}: no CLIP-MoE checkpoint at {path}. Set {ENV_VAR}=<dir> or put one there, "
        f"e.g. `clip-moe convert clip-moe-4-2-sharegpt4v.pt {path} --from official-clip-moe` (the released weights) "
        f"or the output of the DMU pipeline; or pass --vision_tower {PREFIX}<dir>. See docs/llava.md."
    )


def resolve_source(name: Optional[str], cfg: Any) -> Optional[str]:
    """The CLIP-MoE checkpoint directory for tower ``name``, or ``None`` when ``name`` is not a CLIP-MoE tower."""
    if not name:
        return None
    saved = getattr(cfg, "mm_vision_config", None)
    if name == DEFAULT_NAME:
        path = default_checkpoint_dir()
        if not path.is_dir() and not saved:
            raise _missing_default_error(path)
        return str(path)
    if name.startswith(PREFIX):
        path = Path(name[len(PREFIX) :]).expanduser()
        if not path.is_dir() and not saved:
            raise ValueError(f"--vision_tower {name}: {path} is not a directory")
        return str(path)
    if os.path.isdir(name) and is_clip_moe_dir(name):
        return name
    if isinstance(saved, dict) and "num_experts" in saved:
        return name
    return None


def _wrap_build_vision_tower(original: Callable) -> Callable:
    def build_vision_tower(vision_tower_cfg: Any, **kwargs: Any):
        """Drop-in for ``llava.model.multimodal_encoder.builder.build_vision_tower``."""
        name = getattr(vision_tower_cfg, "mm_vision_tower", getattr(vision_tower_cfg, "vision_tower", None))
        source = resolve_source(name, vision_tower_cfg)
        if source is None:
            return original(vision_tower_cfg, **kwargs)
        return LlavaCLIPMoEVisionTower(name, args=vision_tower_cfg, source=source, **kwargs)

    return build_vision_tower


def apply() -> None:
    """Install the CLIP-MoE ``build_vision_tower`` in LLaVA's builder and ``llava_arch`` modules."""
    import llava.model.llava_arch as llava_arch
    import llava.model.multimodal_encoder.builder as builder

    wrap(builder, "build_vision_tower", _wrap_build_vision_tower)
    set_attribute(llava_arch, "build_vision_tower", builder.build_vision_tower)
