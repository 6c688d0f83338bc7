"""Configurations of SigLIP-MoE and SigLIP 2-MoE: HF SigLIP's / SigLIP 2's fields plus the MoE settings.

SigLIP 2 comes in two variants: fixed-resolution ("FixRes") checkpoints are HF ``SiglipModel``s (``model_type``
``siglip``) and are read by the SigLIP-MoE classes; NaFlex checkpoints are HF ``Siglip2Model``s (``siglip2``),
read by the SigLIP 2-MoE classes, whose image tower takes flattened patches of any aspect ratio. Fields are
type- and range-checked as in the CLIP-MoE configs.
"""

import math
from typing import Any, Dict, Optional

from mllm_encoder.configuration_moe_base import (
    MoETowerConfig,
    TextTowerFields,
    TowerConfig,
    TwoTowerConfig,
    check_bool,
    check_int,
    check_number,
    check_patch_grid,
)

# SigLIP's initialisation of the sigmoid loss's temperature and bias (the paper's t' = log 10, b = -10).
DEFAULT_LOGIT_SCALE = math.log(10.0)
DEFAULT_LOGIT_BIAS = -10.0


class _SiglipMoETowerConfig(MoETowerConfig):
    """The shared tower fields (see ``MoETowerConfig``) with SigLIP's defaults: ViT-B/16's shape,
    ``gelu_pytorch_tanh`` and LayerNorm epsilon 1e-6."""

    def __init__(
        self,
        hidden_size: int = 768,
        intermediate_size: int = 3072,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        hidden_act: str = "gelu_pytorch_tanh",
        layer_norm_eps: float = 1e-6,
        **kwargs: Any,
    ):
        super().__init__(
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            hidden_act=hidden_act,
            layer_norm_eps=layer_norm_eps,
            **kwargs,
        )


class SiglipMoEVisionConfig(_SiglipMoETowerConfig):
    """Configuration of the SigLIP-MoE image tower (a ViT without class token).

    Takes the shared tower fields plus ``num_channels``, ``image_size``, ``patch_size`` and ``vision_use_head``
    (the multihead-attention pooling head that gives ``pooler_output``; the two-tower model needs it).
    """

    model_type = "siglip_moe_vision_model"
    hf_model_type = "siglip_vision_model"
    tower_key = "vision_config"
    naflex = False  # images as [batch, channels, height, width] through a conv patch embedding

    def __init__(
        self,
        num_channels: int = 3,
        image_size: int = 224,
        patch_size: int = 16,
        vision_use_head: bool = True,
        **kwargs: Any,
    ):
        self.num_channels = check_int("num_channels", num_channels, 1)
        self.image_size, self.patch_size = check_patch_grid(image_size, patch_size)
        self.vision_use_head = check_bool("vision_use_head", vision_use_head)
        super().__init__(**kwargs)

    def image_processor_settings(self) -> Dict[str, Any]:
        """Arguments of the family's image processor for this tower: a square resize to ``image_size``, no crop
        (``SiglipImageProcessor``'s default mean and std, 0.5)."""
        return {"size": {"height": self.image_size, "width": self.image_size}}


class SiglipMoETextConfig(TextTowerFields, _SiglipMoETowerConfig):
    """Configuration of the SigLIP-MoE text tower (bidirectional; pooled from the last token through ``head``).

    Takes the shared tower fields plus ``vocab_size``, ``max_position_embeddings``, the special token ids and
    ``projection_size`` (the width of ``head``; ``None``: ``hidden_size``, as in HF SigLIP).
    """

    model_type = "siglip_moe_text_model"
    hf_model_type = "siglip_text_model"
    tower_key = "text_config"

    def __init__(
        self,
        vocab_size: int = 32000,
        max_position_embeddings: int = 64,
        pad_token_id: Optional[int] = 1,
        bos_token_id: Optional[int] = 49406,
        eos_token_id: Optional[int] = 49407,
        projection_size: Optional[int] = None,
        **kwargs: Any,
    ):
        super().__init__(vocab_size, max_position_embeddings, pad_token_id, bos_token_id, eos_token_id, **kwargs)
        self.projection_size = check_int(
            "projection_size", self.hidden_size if projection_size is None else projection_size, 1
        )


class SiglipMoEConfig(TwoTowerConfig):
    """Configuration of a two-tower SigLIP-MoE.

    Args:
        text_config: a ``SiglipMoETextConfig`` or its dict.
        vision_config: a ``SiglipMoEVisionConfig`` or its dict (``vision_use_head`` must be true).
        logit_scale_init_value, logit_bias_init_value: initial log temperature and bias of the sigmoid loss
            (SigLIP's log 10 and -10; HF ``SiglipModel`` starts both at 0, and loaded weights replace them).
    """

    model_type = "siglip_moe"
    hf_model_type = "siglip"
    sub_configs = {"text_config": SiglipMoETextConfig, "vision_config": SiglipMoEVisionConfig}

    def __init__(
        self,
        text_config: TowerConfig = None,
        vision_config: TowerConfig = None,
        logit_scale_init_value: float = DEFAULT_LOGIT_SCALE,
        logit_bias_init_value: float = DEFAULT_LOGIT_BIAS,
        **kwargs: Any,
    ):
        super().__init__(text_config, vision_config, **kwargs)
        if not self.vision_config.vision_use_head:
            raise ValueError("vision_config.vision_use_head must be true: the image embedding is the pooling head's")
        self.logit_scale_init_value = check_number("logit_scale_init_value", logit_scale_init_value, -math.inf)
        self.logit_bias_init_value = check_number("logit_bias_init_value", logit_bias_init_value, -math.inf)


class Siglip2MoEVisionConfig(_SiglipMoETowerConfig):
    """Configuration of the SigLIP 2-MoE (NaFlex) image tower: flattened patches, resized position grid.

    Takes the shared tower fields plus ``num_channels``, ``patch_size``, ``num_patches`` (the learned position
    grid, a square number) and ``vision_use_head``.
    """

    model_type = "siglip2_moe_vision_model"
    hf_model_type = "siglip2_vision_model"
    tower_key = "vision_config"
    naflex = True  # images as [batch, patches, channels * patch_size**2] with spatial_shapes and a patch mask

    def __init__(
        self,
        num_channels: int = 3,
        patch_size: int = 16,
        num_patches: int = 256,
        vision_use_head: bool = True,
        **kwargs: Any,
    ):
        self.num_channels = check_int("num_channels", num_channels, 1)
        self.patch_size = check_int("patch_size", patch_size, 1)
        self.num_patches = check_int("num_patches", num_patches, 1)
        if math.isqrt(num_patches) ** 2 != num_patches:
            raise ValueError(f"num_patches must be a square number (a square position grid), got {num_patches}")
        self.vision_use_head = check_bool("vision_use_head", vision_use_head)
        super().__init__(**kwargs)

    def image_processor_settings(self) -> Dict[str, Any]:
        """Arguments of the family's image processor for this tower: patches of ``patch_size``, at most the
        position grid's count per image."""
        return {"patch_size": self.patch_size, "max_num_patches": self.num_patches}


class Siglip2MoETextConfig(SiglipMoETextConfig):
    """Configuration of the SigLIP 2-MoE text tower (the SigLIP text tower; Gemma's 256k vocabulary)."""

    model_type = "siglip2_moe_text_model"
    hf_model_type = "siglip2_text_model"

    def __init__(self, vocab_size: int = 256000, **kwargs: Any):
        super().__init__(vocab_size=vocab_size, **kwargs)


class Siglip2MoEConfig(SiglipMoEConfig):
    """Configuration of a two-tower SigLIP 2-MoE (NaFlex); the fields of :class:`SiglipMoEConfig`."""

    model_type = "siglip2_moe"
    hf_model_type = "siglip2"
    sub_configs = {"text_config": Siglip2MoETextConfig, "vision_config": Siglip2MoEVisionConfig}

    def __init__(self, text_config: TowerConfig = None, vision_config: TowerConfig = None, **kwargs: Any):
        # Explicit: transformers 5.x would otherwise generate an __init__ for a config class without one.
        super().__init__(text_config=text_config, vision_config=vision_config, **kwargs)
