"""Tiny models for tests, in one place (importable from any test directory): CLIP / SigLIP (MoE) configurations,
saved tiny checkpoints, and a reference CLIP-MoE in OpenAI's released layout (the converters' source).
LLaVA's own fixtures (tokenizer, LLM, LLaVA checkpoints, images, conversations) are in ``llava_fixtures``."""

import collections
from pathlib import Path

import torch
from torch import nn

# The shape every tiny tower shares: width 32, FFN 64, 4 heads; images 32x32 in 8x8 patches, texts of 16 tokens.
TINY_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8
)
TINY_TEXT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16
)


def tiny_vision_config(**overrides) -> dict:
    """A 3-layer ViT on 32x32 images with 8x8 patches (16 patches + CLS)."""
    return {**TINY_VISION, "hidden_act": "quick_gelu", **overrides}


def tiny_text_config(**overrides) -> dict:
    """A 2-layer causal text tower over the real CLIP vocabulary, context 16."""
    return {**TINY_TEXT, "vocab_size": 49408, "hidden_act": "quick_gelu", **overrides}


def tiny_siglip_vision_config(**overrides) -> dict:
    """A 3-layer SigLIP ViT on 32x32 images with 8x8 patches (16 patches, no class token)."""
    return {**TINY_VISION, **overrides}


def tiny_siglip_text_config(**overrides) -> dict:
    """A 2-layer bidirectional SigLIP text tower over 256 token ids, context 16."""
    return {**TINY_TEXT, "vocab_size": 256, "pad_token_id": 1, "bos_token_id": None, "eos_token_id": 2, **overrides}


def tiny_clip_moe_config(num_experts: int = 4, top_k: int = 2, **overrides):
    """A tiny two-tower CLIP-MoE config, MoE in every layer of both towers unless overridden."""
    from mllm_encoder import CLIPMoEConfig

    moe = dict(num_experts=num_experts, top_k=top_k)
    return CLIPMoEConfig(
        vision_config=tiny_vision_config(**moe), text_config=tiny_text_config(**moe), projection_dim=16, **overrides
    )


def tiny_siglip_moe_config(num_experts: int = 4, top_k: int = 2, **overrides):
    """A tiny two-tower SigLIP-MoE config, MoE in every layer of both towers unless overridden."""
    from mllm_encoder import SiglipMoEConfig

    moe = dict(num_experts=num_experts, top_k=top_k)
    return SiglipMoEConfig(
        vision_config=tiny_siglip_vision_config(**moe), text_config=tiny_siglip_text_config(**moe), **overrides
    )


def write_tiny_siglip_base(out_dir, tokenizer_dir, image_size: int = 32, context: int = 32, seed: int = 0):
    """A saved dense tiny SigLIP-MoE (the DMU tests' base), with SigLIP's image processor and the tokenizer of
    ``tokenizer_dir`` (the CLIP one in tests: SigLIP's own is a SentencePiece model). Returns the directory."""
    from transformers import AutoTokenizer, SiglipImageProcessor

    from mllm_encoder import SiglipMoEConfig, SiglipMoEModel
    from mllm_encoder.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    config = SiglipMoEConfig(
        vision_config=tiny_siglip_vision_config(num_hidden_layers=2, image_size=image_size),
        text_config=tiny_siglip_text_config(vocab_size=49408, max_position_embeddings=context, eos_token_id=49407),
    )
    processor = SiglipImageProcessor(size={"height": image_size, "width": image_size})
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return save_checkpoint(SiglipMoEModel(config), out_dir, processor, tokenizer)


def write_tiny_clip_base(out_dir, tokenizer_dir, image_size: int = 32, seed: int = 0) -> Path:
    """A saved dense tiny CLIP-MoE (the DMU and experiments tests' base, 2 layers per tower) with the real CLIP
    tokenizer of ``tokenizer_dir`` (context 32). Returns the directory."""
    from transformers import AutoTokenizer

    from mllm_encoder import CLIPMoEConfig, CLIPMoEModel
    from mllm_encoder.checkpoint import default_image_processor, save_checkpoint

    torch.manual_seed(seed)
    config = CLIPMoEConfig(
        vision_config=tiny_vision_config(num_hidden_layers=2, image_size=image_size),
        text_config=tiny_text_config(max_position_embeddings=32, eos_token_id=49407),
        projection_dim=16,
    )
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return save_checkpoint(CLIPMoEModel(config), out_dir, default_image_processor(image_size), tokenizer)


def _distinct_experts(model: nn.Module) -> nn.Module:
    """Redraw the FFN weights so that routing depends on the input and the experts differ."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".mlp." in name:
                param.normal_(0.0, 0.2)
    return model


def build_tiny_clip_moe(
    out_dir, num_experts: int = 4, top_k: int = 2, seed: int = 0, num_layers: int = 3, image_size: int = 32
) -> Path:
    """A random tiny CLIP-MoE checkpoint with distinct experts, MoE in every layer, text over 128 token ids (the
    LLaVA tests' tower: ``--vision_tower clip-moe:<dir>``). Returns the directory."""
    from mllm_encoder import CLIPMoEConfig, CLIPMoEModel
    from mllm_encoder.checkpoint import save_checkpoint

    moe = dict(num_experts=num_experts, top_k=top_k, num_hidden_layers=num_layers)
    config = CLIPMoEConfig(
        vision_config=tiny_vision_config(image_size=image_size, **moe),
        text_config=tiny_text_config(vocab_size=128, eos_token_id=127, bos_token_id=126, **moe),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    return save_checkpoint(_distinct_experts(CLIPMoEModel(config)), out_dir)


def build_tiny_siglip_moe(out_dir, num_experts: int = 4, top_k: int = 2, seed: int = 0) -> Path:
    """A random tiny SigLIP-MoE checkpoint (:func:`tiny_siglip_moe_config`, 32 px) with distinct experts and SigLIP's
    image processor. Returns the directory."""
    from transformers import SiglipImageProcessor

    from mllm_encoder import SiglipMoEModel
    from mllm_encoder.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    model = _distinct_experts(SiglipMoEModel(tiny_siglip_moe_config(num_experts=num_experts, top_k=top_k)))
    return save_checkpoint(model, out_dir, SiglipImageProcessor(size={"height": 32, "width": 32}))


# A reference CLIP-MoE in OpenAI's layout (the released checkpoints' names), for the converters' tests.
REFERENCE_WIDTH, REFERENCE_HEADS, REFERENCE_EMBED = 64, 1, 24  # heads = width // 64, as the converter assumes


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


def mlp(width):
    return nn.Sequential(
        collections.OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=QuickGELU(), c_proj=nn.Linear(4 * width, width))
    )


class ReferenceBlock(nn.Module):
    """OpenAI's residual block; with ``num_experts`` it is the released CLIP-MoE's MoE block."""

    def __init__(self, width, num_experts=0, top_k=2, causal_length=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, REFERENCE_HEADS, batch_first=True)
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.top_k = top_k
        if num_experts:
            self.experts = nn.ModuleList([mlp(width) for _ in range(num_experts)])
            self.gate = nn.Linear(width, num_experts, bias=False)
        else:
            self.mlp = mlp(width)
        self.causal_length = causal_length

    def ffn(self, x):
        if not hasattr(self, "experts"):
            return self.mlp(x)
        probs = torch.softmax(self.gate(x), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for slot in range(self.top_k):
            for e, expert in enumerate(self.experts):
                out = out + (chosen[..., slot] == e).unsqueeze(-1) * weights[..., slot, None] * expert(x)
        return out

    def forward(self, x):
        mask = None
        if self.causal_length:
            n = x.shape[1]
            mask = torch.full((n, n), float("-inf")).triu(1)
        x = x + self.attn(*[self.ln_1(x)] * 3, need_weights=False, attn_mask=mask)[0]
        return x + self.ffn(self.ln_2(x))


class ReferenceOpenAICLIPMoE(nn.Module):
    """A tiny CLIP(-MoE) in the OpenAI / Long-CLIP layout, the last ``moe_last`` blocks MoE."""

    def __init__(self, num_experts=4, moe_last=2, context=24, long_clip=True, vocab=49408):
        super().__init__()
        layers = 3
        self.visual = nn.Module()
        self.visual.conv1 = nn.Conv2d(3, REFERENCE_WIDTH, 8, 8, bias=False)
        self.visual.class_embedding = nn.Parameter(torch.randn(REFERENCE_WIDTH))
        self.visual.positional_embedding = nn.Parameter(torch.randn(17, REFERENCE_WIDTH) * 0.1)
        self.visual.ln_pre, self.visual.ln_post = nn.LayerNorm(REFERENCE_WIDTH), nn.LayerNorm(REFERENCE_WIDTH)
        self.visual.transformer = nn.Module()
        experts = [num_experts if i >= layers - moe_last else 0 for i in range(layers)]
        self.visual.transformer.resblocks = nn.ModuleList([ReferenceBlock(REFERENCE_WIDTH, e) for e in experts])
        self.visual.proj = nn.Parameter(torch.randn(REFERENCE_WIDTH, REFERENCE_EMBED) * 0.1)
        self.token_embedding = nn.Embedding(vocab, REFERENCE_WIDTH)
        self.positional_embedding = nn.Parameter(torch.randn(context, REFERENCE_WIDTH) * 0.1)
        if long_clip:
            self.positional_embedding_res = nn.Parameter(torch.randn(context, REFERENCE_WIDTH) * 0.1)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(
            [ReferenceBlock(REFERENCE_WIDTH, e, causal_length=context) for e in experts]
        )
        self.ln_final = nn.LayerNorm(REFERENCE_WIDTH)
        self.text_projection = nn.Parameter(torch.randn(REFERENCE_WIDTH, REFERENCE_EMBED) * 0.1)
        self.logit_scale = nn.Parameter(torch.tensor(4.6))
        for param in self.parameters():  # non-trivial LayerNorms and biases
            if param.dim() == 1 and param.shape[0] != REFERENCE_EMBED:
                param.data.normal_(1.0 if param.abs().sum() == param.numel() else 0.0, 0.1)

    def encode_image(self, pixel_values):
        v = self.visual
        x = v.conv1(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], 1) + v.positional_embedding
        x = v.ln_pre(x)
        for block in v.transformer.resblocks:
            x = block(x)
        return v.ln_post(x[:, 0]) @ v.proj

    def encode_text(self, text):
        positions = self.positional_embedding
        if hasattr(self, "positional_embedding_res"):
            short = torch.zeros(positions.shape[0], 1)
            short[:20] = 1
            positions = positions * short + self.positional_embedding_res * (1 - short)
        x = self.token_embedding(text) + positions[: text.shape[1]]
        for block in self.transformer.resblocks:
            x = block(x)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection
