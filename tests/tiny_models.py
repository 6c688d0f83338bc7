"""Tiny CLIP / CLIP-MoE configurations for tests (importable from any test directory)."""

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
    import torch
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
