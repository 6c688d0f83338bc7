"""Tiny CLIP / CLIP-MoE configurations for tests (importable from any test directory)."""


def tiny_vision_config(**overrides) -> dict:
    """A 3-layer ViT on 32x32 images with 8x8 patches (16 patches + CLS)."""
    config = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        hidden_act="quick_gelu",
    )
    config.update(overrides)
    return config


def tiny_text_config(**overrides) -> dict:
    """A 2-layer causal text tower over the real CLIP vocabulary, context 16."""
    config = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=49408,
        max_position_embeddings=16,
        hidden_act="quick_gelu",
    )
    config.update(overrides)
    return config


def tiny_clip_moe_config(num_experts: int = 4, top_k: int = 2, **overrides):
    """A tiny two-tower CLIP-MoE config, MoE in every layer of both towers unless overridden."""
    from mllm_encoder import CLIPMoEConfig

    moe = dict(num_experts=num_experts, top_k=top_k)
    return CLIPMoEConfig(
        vision_config=tiny_vision_config(**moe),
        text_config=tiny_text_config(**moe),
        projection_dim=16,
        **overrides,
    )
