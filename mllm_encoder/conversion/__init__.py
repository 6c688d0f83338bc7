"""Weight conversion into the CLIP-MoE layout: pure ``convert_x(state_dict) -> (config, state_dict)`` functions."""

from mllm_encoder.conversion.openai import convert_openai_clip
from mllm_encoder.conversion.timm import convert_timm_clip_vit

__all__ = ["convert_openai_clip", "convert_timm_clip_vit"]
