"""Configurations of CLIP-MoE: HF CLIP's fields plus the Mixture-of-Experts settings of each tower.

The shared fields, checks and the two-tower base live in :mod:`mllm_encoder.configuration_moe_base`; this file
states what CLIP adds: its ``model_type``s, image and text fields, and the projection. Every field is type- and
range-checked when a config is built; a bad value raises ``ValueError`` naming the field.
"""

import math
from typing import Any, Dict

from mllm_encoder.configuration_moe_base import (  # noqa: F401  (the checks are re-exported: their old home)
    MoETowerConfig,
    TextTowerFields,
    TowerConfig,
    TwoTowerConfig,
    check_bool,
    check_int,
    check_number,
    check_patch_grid,
)


class CLIPMoEVisionConfig(MoETowerConfig):
    """Configuration of the CLIP-MoE image tower (a ViT).

    Takes every field of ``MoETowerConfig`` plus ``num_channels``, ``image_size`` and ``patch_size``.
    The defaults are OpenAI ViT-B/32's shape; the MoE defaults make a dense tower.
    """

    model_type = "clip_moe_vision_model"
    hf_model_type = "clip_vision_model"
    tower_key = "vision_config"

    def __init__(
        self,
        hidden_size: int = 768,
        intermediate_size: int = 3072,
        num_attention_heads: int = 12,
        num_channels: int = 3,
        image_size: int = 224,
        patch_size: int = 32,
        **kwargs: Any,
    ):
        self.num_channels = check_int("num_channels", num_channels, 1)
        self.image_size, self.patch_size = check_patch_grid(image_size, patch_size)
        super().__init__(
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_attention_heads=num_attention_heads,
            **kwargs,
        )

    def image_processor_settings(self) -> Dict[str, Any]:
        """Arguments of the family's image processor for this tower: OpenAI CLIP's shortest-side resize and centre
        crop to ``image_size`` (``CLIPImageProcessor``'s default mean and std are OpenAI's)."""
        return {
            "size": {"shortest_edge": self.image_size},
            "crop_size": {"height": self.image_size, "width": self.image_size},
        }


class CLIPMoETextConfig(TextTowerFields, MoETowerConfig):
    """Configuration of the CLIP-MoE text tower (a causal transformer).

    Takes every field of ``MoETowerConfig`` plus ``vocab_size``, ``max_position_embeddings`` (the
    context length) and the special token ids. As in HF CLIP, the pooled token is the first
    ``eos_token_id`` of each sequence, except that ``eos_token_id == 2`` selects the legacy OpenAI rule
    (the position of the largest token id).
    """

    model_type = "clip_moe_text_model"
    hf_model_type = "clip_text_model"
    tower_key = "text_config"

    def __init__(
        self,
        vocab_size: int = 49408,
        max_position_embeddings: int = 77,
        pad_token_id: int = 1,
        bos_token_id: int = 49406,
        eos_token_id: int = 49407,
        **kwargs: Any,
    ):
        super().__init__(vocab_size, max_position_embeddings, pad_token_id, bos_token_id, eos_token_id, **kwargs)


class CLIPMoEConfig(TwoTowerConfig):
    """Configuration of a two-tower CLIP-MoE.

    Args:
        text_config: a ``CLIPMoETextConfig`` or its dict.
        vision_config: a ``CLIPMoEVisionConfig`` or its dict.
        projection_dim: width of the joint embedding space.
        logit_scale_init_value: initial value of the learnable log temperature (2.6592 = log(1/0.07)).
    """

    model_type = "clip_moe"
    hf_model_type = "clip"
    sub_configs = {"text_config": CLIPMoETextConfig, "vision_config": CLIPMoEVisionConfig}

    def __init__(
        self,
        text_config: TowerConfig = None,
        vision_config: TowerConfig = None,
        projection_dim: int = 512,
        logit_scale_init_value: float = 2.6592,
        **kwargs: Any,
    ):
        for key in ("text_config_dict", "vision_config_dict"):
            kwargs.pop(key, None)
        super().__init__(text_config, vision_config, **kwargs)
        self.projection_dim = check_int("projection_dim", projection_dim, 1)
        self.logit_scale_init_value = check_number("logit_scale_init_value", logit_scale_init_value, -math.inf)
