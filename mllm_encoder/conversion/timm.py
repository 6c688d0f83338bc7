"""Convert a timm CLIP ViT image tower (e.g. ``vit_large_patch14_clip_336.openai``) to a CLIP-MoE vision model.

The timm layout: ``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``norm_pre`` (CLIP's ``ln_pre``),
``blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm`` (``ln_post``) and
``head`` (the image projection, dropped: a vision tower for MLLMs exposes hidden states).
"""

import logging
import re
from typing import Dict, Optional, Tuple

import torch

from mllm_encoder.configuration_clip_moe import CLIPMoEVisionConfig

logger = logging.getLogger(__name__)

StateDict = Dict[str, torch.Tensor]
HEAD_WIDTH = 64


def infer_timm_config(state_dict: StateDict, num_heads: Optional[int] = None) -> CLIPMoEVisionConfig:
    """The dense vision config of a timm CLIP ViT state dict (heads default to width // 64)."""
    for key in (
        "patch_embed.proj.weight",
        "pos_embed",
        "cls_token",
        "norm_pre.weight",
        "blocks.0.mlp.fc1.weight",
    ):
        if key not in state_dict:
            raise ValueError(f"state dict has no {key!r}: not a timm CLIP ViT (pre-norm, class token)")
    patch = state_dict["patch_embed.proj.weight"]
    width = patch.shape[0]
    grid = round((state_dict["pos_embed"].shape[1] - 1) ** 0.5)
    depth = len({int(m.group(1)) for k in state_dict for m in [re.match(r"blocks\.(\d+)\.", k)] if m})
    return CLIPMoEVisionConfig(
        hidden_size=width,
        intermediate_size=state_dict["blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=depth,
        num_attention_heads=num_heads or width // HEAD_WIDTH,
        image_size=grid * patch.shape[-1],
        patch_size=patch.shape[-1],
        num_channels=patch.shape[1],
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def _convert_block(state_dict: StateDict, i: int) -> StateDict:
    src, dst = f"blocks.{i}.", f"vision_model.encoder.layers.{i}."
    out = {}
    for name, weight, bias in zip(
        ("q_proj", "k_proj", "v_proj"),
        state_dict[f"{src}attn.qkv.weight"].chunk(3),
        state_dict[f"{src}attn.qkv.bias"].chunk(3),
    ):
        out[f"{dst}self_attn.{name}.weight"] = weight
        out[f"{dst}self_attn.{name}.bias"] = bias
    renames = {
        "attn.proj": "self_attn.out_proj",
        "norm1": "layer_norm1",
        "norm2": "layer_norm2",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    for old, new in renames.items():
        for param in ("weight", "bias"):
            out[f"{dst}{new}.{param}"] = state_dict[f"{src}{old}.{param}"]
    return out


def convert_timm_clip_vit(
    state_dict: StateDict, num_heads: Optional[int] = None
) -> Tuple[CLIPMoEVisionConfig, StateDict]:
    """``timm state dict -> (CLIPMoEVisionConfig, CLIPMoEVisionModel state dict)``; pure and checked."""
    config = infer_timm_config(state_dict, num_heads)
    if "patch_embed.proj.bias" in state_dict:
        raise ValueError("patch_embed.proj has a bias: not a CLIP ViT (CLIP's patch embedding is bias-free)")
    out = {
        "vision_model.embeddings.class_embedding": state_dict["cls_token"].reshape(-1),
        "vision_model.embeddings.patch_embedding.weight": state_dict["patch_embed.proj.weight"],
        "vision_model.embeddings.position_embedding.weight": state_dict["pos_embed"][0],
    }
    for old, new in (("norm_pre", "pre_layrnorm"), ("norm", "post_layernorm")):
        out[f"vision_model.{new}.weight"] = state_dict[f"{old}.weight"]
        out[f"vision_model.{new}.bias"] = state_dict[f"{old}.bias"]
    for i in range(config.num_hidden_layers):
        out.update(_convert_block(state_dict, i))
    used = {"cls_token", "patch_embed.proj.weight", "pos_embed", "norm_pre.weight", "norm_pre.bias"}
    used |= {"norm.weight", "norm.bias", "head.weight", "head.bias"}
    used |= {k for k in state_dict if k.startswith("blocks.")}
    left = sorted(set(state_dict) - used)
    if left:
        raise ValueError(f"{len(left)} tensors of the timm checkpoint were not converted, e.g. {left[:5]}")
    if "head.weight" in state_dict:
        logger.info("dropped timm's head %s (the image projection)", tuple(state_dict["head.weight"].shape))
    return config, {k: v.contiguous() for k, v in out.items()}
