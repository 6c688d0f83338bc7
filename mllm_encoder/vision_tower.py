"""A LLaVA vision tower backed by a CLIP-MoE or SigLIP-MoE (or dense CLIP / SigLIP) vision encoder.

``CLIPMoEVisionTower`` follows the interface of LLaVA's ``CLIPVisionTower`` (``forward``, ``is_loaded``,
``load_model``, ``image_processor``, ``hidden_size``, ``num_patches`` ...) with three differences:

* the encoder's parameters are created in ``__init__`` and the tower reports itself loaded, so weights stored
  in a LLaVA checkpoint (fine-tuned experts and routers included) are restored by ``from_pretrained``
  instead of being silently replaced by the original encoder;
* only the layers up to ``mm_vision_select_layer`` are built and run;
* when trainable (``unfreeze_mm_vision_tower``) it runs with gradients and its encoder computes the MoE
  load-balancing loss (``aux_loss`` of each encoder call's outputs; ``llava_patch.aux_loss`` adds it to the
  language model's loss); frozen, it computes none.
"""

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn
from transformers import CLIPImageProcessor

from mllm_encoder.checkpoint import (
    CONFIG_META_KEYS,
    image_processor_class,
    load_image_processor,
    read_checkpoint_tensors,
    read_vision_config_dict,
)
from mllm_encoder.configuration_moe_base import MoETowerConfig
from mllm_encoder.families import Family, family_of
from mllm_encoder.towers import VISION

logger = logging.getLogger(__name__)


def tower_family(config: Dict[str, Any], where: str) -> Family:
    """The family of a vision config dict (by its ``model_type``; CLIP when there is none), when that family's
    image tower can serve LLaVA (``Family.llava``); ``ValueError`` naming ``where`` otherwise."""
    model_type = config.get("model_type")
    family = family_of(model_type)
    if family.llava is None:
        raise ValueError(
            f"{where}: a {family.name} tower ({model_type}) cannot serve as a LLaVA tower ({family.not_llava})"
        )
    return family


def resolve_select_layer(select_layer: int, num_hidden_layers: int) -> int:
    """Index into ``hidden_states`` (0 = embeddings, i = output of layer i) for LLaVA's ``select_layer``."""
    index = select_layer + num_hidden_layers + 1 if select_layer < 0 else select_layer
    if not 0 <= index <= num_hidden_layers:
        raise ValueError(
            f"mm_vision_select_layer={select_layer} is out of range for a tower with {num_hidden_layers} layers"
        )
    return index


class CLIPMoEVisionTower(nn.Module):
    """LLaVA vision tower over a CLIP-MoE checkpoint; a drop-in for ``llava``'s ``CLIPVisionTower``.

    Args:
        vision_tower: the name stored as ``mm_vision_tower`` (kept for the LLaVA config).
        args: LLaVA model arguments or a LLaVA config (``mm_vision_select_layer``, ``mm_vision_select_feature``,
            ``unfreeze_mm_vision_tower``; a saved config also carries ``mm_vision_config`` and
            ``mm_vision_image_processor``, which take precedence over the checkpoint directory).
        delay_load: ``True`` when LLaVA restores a trained model: the weights then come from that model's
            checkpoint; ``False`` loads them from ``source``.
        source: the CLIP-MoE checkpoint directory (may be ``None`` when ``args`` carries the configs).
    """

    def __init__(self, vision_tower: str, args: Any, delay_load: bool = False, source: Optional[str] = None):
        super().__init__()
        self.vision_tower_name = vision_tower
        self.source = source
        self.select_layer = args.mm_vision_select_layer
        self.select_feature = getattr(args, "mm_vision_select_feature", "patch")
        if self.select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"Unexpected mm_vision_select_feature: {self.select_feature!r}")
        self.family, self.cfg_only = self._build_config(
            getattr(args, "mm_vision_config", None), getattr(args, "_name_or_path", "")
        )
        self.image_processor = self._build_image_processor(getattr(args, "mm_vision_image_processor", None))
        self.num_computed_layers = resolve_select_layer(self.select_layer, self.cfg_only.num_hidden_layers)
        self.vision_tower = self._build_encoder()
        self.is_loaded = True
        if not delay_load:
            self.load_source_weights()
        self.unfreeze = bool(getattr(args, "unfreeze_mm_vision_tower", False))
        self.reset_trainable()

    def reset_trainable(self) -> None:
        """Freeze the encoder unless ``unfreeze_mm_vision_tower`` was set (loaders may reset ``requires_grad``)."""
        self.vision_tower.requires_grad_(self.unfreeze)

    def _require_source(self, what: str) -> Path:
        if self.source is None or not Path(self.source).is_dir():
            raise ValueError(
                f"vision tower {self.vision_tower_name!r}: the CLIP-MoE checkpoint directory {self.source!r} "
                f"is needed for {what} but does not exist"
            )
        return Path(self.source)

    def _build_config(self, saved: Optional[Dict[str, Any]], llava_dir: str = "") -> Tuple[Family, MoETowerConfig]:
        """The tower's family and config: ``saved`` (a LLaVA config's ``mm_vision_config``, from ``llava_dir``) or
        the source checkpoint's; a bad field raises ``ValueError`` naming the file and the field."""
        if saved:
            config = dict(saved)
            where = f"{Path(llava_dir) / 'config.json' if llava_dir else 'the LLaVA config'}: mm_vision_config"
        else:
            config = read_vision_config_dict(self._require_source("its config"))
            where = str(Path(self.source) / "config.json")
        family = tower_family(config, f"vision tower {self.vision_tower_name!r}")
        for key in CONFIG_META_KEYS:
            config.pop(key, None)
        try:
            return family, family.vision_model.config_class(**config)
        except (ValueError, TypeError) as error:
            raise ValueError(f"{where}: {error}") from error

    def _build_image_processor(self, saved: Optional[Dict[str, Any]]) -> CLIPImageProcessor:
        if saved:
            return image_processor_class(saved.get("image_processor_type"), "mm_vision_image_processor").from_dict(
                saved
            )
        return load_image_processor(self._require_source("its image processor"))

    def _build_encoder(self) -> nn.Module:
        """The encoder truncated after the selected layer (later layers and the final norm are never used)."""
        truncated = type(self.cfg_only)(**self.cfg_only.to_dict())
        if getattr(truncated, "vision_use_head", False):
            truncated.vision_use_head = False  # a pooling head reads the last layer, which LLaVA never uses
        truncated.num_hidden_layers = self.num_computed_layers
        moe_layers = getattr(truncated, "moe_layers", None)
        if moe_layers is not None:
            truncated.moe_layers = [i for i in moe_layers if i < self.num_computed_layers]
        encoder = self.family.vision_model(truncated)
        encoder.vision_model.post_layernorm = nn.Identity()
        return encoder

    def load_source_weights(self) -> None:
        """Copy the encoder weights (up to the selected layer) from the CLIP-MoE checkpoint directory."""
        source = self._require_source("its weights")
        expected = self.vision_tower.state_dict()
        checkpoint = read_checkpoint_tensors(source, f"{VISION.module}.")
        missing = sorted(set(expected) - set(checkpoint))
        if missing:
            raise ValueError(f"{source}: the checkpoint lacks {len(missing)} vision weights, e.g. {missing[:3]}")
        state_dict = {name: checkpoint[name] for name in expected}
        self.load_encoder_state(state_dict)
        logger.info("loaded %d vision tower tensors from %s", len(state_dict), source)

    def load_encoder_state(self, state_dict: Dict[str, torch.Tensor]) -> None:
        """Copy ``state_dict`` into the encoder (``llava_patch`` overrides it for DeepSpeed ZeRO-3 partitions)."""
        self.vision_tower.load_state_dict(state_dict)

    def load_model(self, device_map: Any = None) -> None:
        """LLaVA API: the weights are built in ``__init__``, so there is nothing left to load."""
        logger.debug("%s is already loaded, `load_model` called again, skipping.", self.vision_tower_name)

    def export_llava_config(self) -> Dict[str, Any]:
        """``mm_*`` keys for the LLaVA config that rebuild this tower without its checkpoint directory."""
        config = self.cfg_only
        return {
            "mm_vision_config": config.to_dict(),
            "mm_vision_image_processor": self.image_processor.to_dict(),
            "mm_vision_num_experts": getattr(config, "num_experts", 1),
            "mm_vision_top_k": getattr(config, "top_k", 1),
            "mm_vision_moe_layers": getattr(config, "moe_layers", None),
            "mm_vision_router_aux_loss_coef": getattr(config, "router_aux_loss_coef", 0.0),
        }

    def is_trainable(self) -> bool:
        """Whether this call runs with gradients: some encoder weight is trainable and grad mode is on."""
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.vision_tower.parameters())

    def feature_select(self, hidden_state: torch.Tensor) -> torch.Tensor:
        """``patch``: drop the class token (CLIP); SigLIP has none, so every token is a patch."""
        prefix = self.vision_tower.vision_model.embeddings.num_prefix_tokens
        return hidden_state[:, prefix:] if self.select_feature == "patch" else hidden_state

    def _encode(self, pixel_values: torch.Tensor, trainable: bool) -> torch.Tensor:
        # The load-balancing loss is computed only when trainable (a frozen tower's has no gradient to give); it
        # stays in the encoder's outputs, where a forward hook on the encoder collects it (llava_patch.aux_loss).
        with torch.set_grad_enabled(trainable):
            outputs = self.vision_tower(
                pixel_values.to(device=self.device, dtype=self.dtype),
                output_hidden_states=True,
                output_aux_loss=trainable,
            )
        return self.feature_select(outputs.hidden_states[-1]).to(pixel_values.dtype)

    def forward(self, images: Union[torch.Tensor, List[torch.Tensor]]):
        """Patch features ``[B, N, hidden]`` of a batch, or a list of ``[1, N, hidden]`` for a list of images
        (one encoder call per image)."""
        trainable = self.is_trainable()
        if isinstance(images, (list, tuple)):
            return [self._encode(image.unsqueeze(0), trainable) for image in images]
        return self._encode(images, trainable)

    @property
    def dummy_feature(self) -> torch.Tensor:
        return torch.zeros(1, self.hidden_size, device=self.device, dtype=self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vision_tower.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.vision_tower.parameters()).device

    @property
    def config(self):
        return self.cfg_only

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def num_patches_per_side(self) -> int:
        return self.config.image_size // self.config.patch_size

    @property
    def num_patches(self) -> int:
        return self.num_patches_per_side**2
