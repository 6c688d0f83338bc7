"""Convert OpenAI-layout CLIP state dicts (OpenAI CLIP, open_clip, Long-CLIP, the released CLIP-MoE).

The OpenAI layout keeps each tower's blocks under ``[visual.]transformer.resblocks.{i}`` with a fused
``attn.in_proj_weight``; an MoE block of the released CLIP-MoE holds ``experts.{e}.c_fc/c_proj`` and a
bias-free ``gate`` instead of ``mlp.c_fc/c_proj``. Long-CLIP's 248-token text context adds
``positional_embedding_res``: positions < 20 use ``positional_embedding``, the rest the residual table.

:func:`convert_openai_clip` is pure: ``state_dict -> (config, state_dict)`` in the CLIP-MoE layout, and it
fails on any source tensor it did not use.
"""

import re
from typing import Dict, List, Tuple

import torch

from mllm_encoder.configuration_clip_moe import CLIPMoEConfig

LONG_CLIP_SHORT_POSITIONS = 20
HEAD_WIDTH = 64
LEGACY_ARGMAX_EOS_TOKEN_ID = 2
IGNORED_KEYS = {"input_resolution", "context_length", "vocab_size", "mask1", "mask2"}

StateDict = Dict[str, torch.Tensor]


class _Source:
    """A source state dict that records which tensors were taken."""

    def __init__(self, state_dict: StateDict):
        self.tensors = {k: v for k, v in state_dict.items() if k not in IGNORED_KEYS}
        self.taken = set()

    def take(self, key: str) -> torch.Tensor:
        if key not in self.tensors:
            raise ValueError(f"state dict has no {key!r}: not an OpenAI-layout CLIP checkpoint")
        self.taken.add(key)
        return self.tensors[key]

    def has(self, key: str) -> bool:
        return key in self.tensors

    def check_all_taken(self) -> None:
        left = sorted(set(self.tensors) - self.taken)
        if left:
            raise ValueError(f"{len(left)} tensors of the checkpoint were not converted, e.g. {left[:5]}")


def _count_blocks(keys, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({int(m.group(1)) for k in keys for m in [pattern.match(k)] if m})


def _count_experts(keys, block_prefix: str) -> int:
    pattern = re.compile(re.escape(block_prefix) + r"experts\.(\d+)\.c_fc\.weight$")
    return len([k for k in keys if pattern.match(k)])


def _moe_layout(source: _Source, prefix: str, num_layers: int) -> Tuple[int, List[int]]:
    experts = [_count_experts(source.tensors, f"{prefix}{i}.") for i in range(num_layers)]
    moe_layers = [i for i, n in enumerate(experts) if n]
    counts = {experts[i] for i in moe_layers}
    if len(counts) > 1:
        raise ValueError(f"{prefix}*: MoE blocks with different expert counts {sorted(counts)}")
    return (counts.pop() if counts else 1), moe_layers


def _tower_shape(source: _Source, prefix: str, width: int, top_k: int) -> dict:
    num_layers = _count_blocks(source.tensors, prefix)
    if num_layers == 0:
        raise ValueError(f"state dict has no {prefix}* blocks")
    num_experts, moe_layers = _moe_layout(source, prefix, num_layers)
    fc_key = f"{prefix}0.mlp.c_fc.weight" if 0 not in moe_layers else f"{prefix}0.experts.0.c_fc.weight"
    return dict(
        hidden_size=width,
        intermediate_size=source.tensors[fc_key].shape[0],
        num_hidden_layers=num_layers,
        num_attention_heads=width // HEAD_WIDTH,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        num_experts=num_experts,
        top_k=min(top_k, num_experts),
        moe_layers=moe_layers if num_experts > 1 else None,
    )


def infer_openai_config(state_dict: StateDict, top_k: int = 2) -> CLIPMoEConfig:
    """The CLIP-MoE config of an OpenAI-layout state dict (sizes, depth, heads = width // 64, experts)."""
    source = _Source(state_dict)
    conv = source.take("visual.conv1.weight")
    vision_width, patch = conv.shape[0], conv.shape[-1]
    grid = round((source.take("visual.positional_embedding").shape[0] - 1) ** 0.5)
    vision = _tower_shape(source, "visual.transformer.resblocks.", vision_width, top_k)
    vision.update(image_size=grid * patch, patch_size=patch, num_channels=conv.shape[1])
    text = _tower_shape(source, "transformer.resblocks.", source.take("ln_final.weight").shape[0], top_k)
    text.update(
        vocab_size=source.take("token_embedding.weight").shape[0],
        max_position_embeddings=source.take("positional_embedding").shape[0],
        eos_token_id=LEGACY_ARGMAX_EOS_TOKEN_ID,
    )
    return CLIPMoEConfig(vision_config=vision, text_config=text, projection_dim=source.take("text_projection").shape[1])


def _convert_block(source: _Source, src: str, dst: str) -> StateDict:
    out = {}
    q, k, v = source.take(f"{src}attn.in_proj_weight").chunk(3)
    q_bias, k_bias, v_bias = source.take(f"{src}attn.in_proj_bias").chunk(3)
    for name, weight, bias in (("q_proj", q, q_bias), ("k_proj", k, k_bias), ("v_proj", v, v_bias)):
        out[f"{dst}self_attn.{name}.weight"] = weight
        out[f"{dst}self_attn.{name}.bias"] = bias
    renames = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2"}
    if source.has(f"{src}mlp.c_fc.weight"):
        renames.update({"mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"})
    else:
        out.update(_convert_experts(source, src, dst))
    for old, new in renames.items():
        for param in ("weight", "bias"):
            out[f"{dst}{new}.{param}"] = source.take(f"{src}{old}.{param}")
    return out


def _convert_experts(source: _Source, src: str, dst: str) -> StateDict:
    num_experts = _count_experts(source.tensors, src)
    out = {f"{dst}mlp.router.weight": source.take(f"{src}gate.weight")}
    for old, new in (("c_fc", "fc1"), ("c_proj", "fc2")):
        for param in ("weight", "bias"):
            stacked = [source.take(f"{src}experts.{e}.{old}.{param}") for e in range(num_experts)]
            out[f"{dst}mlp.experts.{new}.{param}"] = torch.stack(stacked)
    return out


def _text_positions(source: _Source) -> torch.Tensor:
    positions = source.take("positional_embedding")
    if not source.has("positional_embedding_res"):
        return positions
    residual = source.take("positional_embedding_res")
    return torch.cat([positions[:LONG_CLIP_SHORT_POSITIONS], residual[LONG_CLIP_SHORT_POSITIONS:]])


def convert_openai_clip(state_dict: StateDict, top_k: int = 2) -> Tuple[CLIPMoEConfig, StateDict]:
    """Convert an OpenAI-layout CLIP or CLIP-MoE state dict to ``(CLIPMoEConfig, CLIP-MoE state dict)``.

    ``top_k`` is not stored in the source checkpoints (the released CLIP-MoE uses 2); it is capped at
    the number of experts. Text pooling keeps OpenAI's rule (the largest token id), which HF CLIP
    configs express as ``eos_token_id=2``.
    """
    config = infer_openai_config(state_dict, top_k)
    source = _Source(state_dict)
    out = {
        "vision_model.embeddings.patch_embedding.weight": source.take("visual.conv1.weight"),
        "vision_model.embeddings.class_embedding": source.take("visual.class_embedding"),
        "vision_model.embeddings.position_embedding.weight": source.take("visual.positional_embedding"),
        "visual_projection.weight": source.take("visual.proj").t(),
        "text_model.embeddings.token_embedding.weight": source.take("token_embedding.weight"),
        "text_model.embeddings.position_embedding.weight": _text_positions(source),
        "text_projection.weight": source.take("text_projection").t(),
        "logit_scale": source.take("logit_scale"),
    }
    for old, new in (
        ("visual.ln_pre", "vision_model.pre_layrnorm"),
        ("visual.ln_post", "vision_model.post_layernorm"),
        ("ln_final", "text_model.final_layer_norm"),
    ):
        out[f"{new}.weight"] = source.take(f"{old}.weight")
        out[f"{new}.bias"] = source.take(f"{old}.bias")
    towers = (
        ("visual.transformer.resblocks.", "vision_model.encoder.layers.", config.vision_config),
        ("transformer.resblocks.", "text_model.encoder.layers.", config.text_config),
    )
    for src, dst, tower in towers:
        for i in range(tower.num_hidden_layers):
            out.update(_convert_block(source, f"{src}{i}.", f"{dst}{i}."))
    source.check_all_taken()
    return config, {k: v.contiguous() for k, v in out.items()}
