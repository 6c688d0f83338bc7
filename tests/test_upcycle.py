"""Sparse upcycling equals the dense model; assembled experts equal a reference MoE computation."""

import pytest
import torch
from tiny_models import tiny_text_config, tiny_vision_config

from mllm_encoder import CLIPMoEConfig, CLIPMoEModel, CLIPMoEVisionConfig, CLIPMoEVisionModel
from mllm_encoder.upcycle import assemble_experts, moe_config, sparse_upcycle


def dense_model(seed: int = 0) -> CLIPMoEModel:
    torch.manual_seed(seed)
    config = CLIPMoEConfig(
        vision_config=tiny_vision_config(), text_config=tiny_text_config(), projection_dim=16
    )
    return CLIPMoEModel(config).eval()


def ffn_variants(base: CLIPMoEModel, n: int):
    """``n`` copies of ``base`` whose FFNs (only) are perturbed differently, as after MCL stages."""
    models = []
    for i in range(n):
        model = CLIPMoEModel(base.config).eval()
        model.load_state_dict(base.state_dict())
        generator = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".mlp." in name:
                    param.add_(0.5 * torch.randn(param.shape, generator=generator))
        models.append(model)
    return models


def inputs():
    torch.manual_seed(7)
    input_ids = torch.randint(1, 40000, (2, 10))
    input_ids[:, -1] = 49407
    return input_ids, torch.randn(2, 3, 32, 32)


def randomise_routers(model):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("router.weight"):
                param.normal_(std=3.0)


@pytest.mark.parametrize("top_k", [1, 2])
def test_sparse_upcycle_equals_dense(top_k):
    dense = dense_model()
    moe = sparse_upcycle(dense, num_experts=4, top_k=top_k).eval()
    randomise_routers(moe)
    input_ids, pixel_values = inputs()
    with torch.no_grad():
        expected = dense(input_ids=input_ids, pixel_values=pixel_values, output_hidden_states=True)
        actual = moe(input_ids=input_ids, pixel_values=pixel_values, output_hidden_states=True)
    assert len(actual.router_logits) == 5
    torch.testing.assert_close(actual.logits_per_image, expected.logits_per_image, atol=1e-5, rtol=1e-5)
    for e, a in zip(expected.vision_model_output.hidden_states, actual.vision_model_output.hidden_states):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


def reference_vision_moe(sources, routers, pixel_values, top_k):
    """The MoE image tower written out by hand from the dense source models' own modules."""
    base = sources[0].vision_model
    hidden = base.pre_layrnorm(base.embeddings(pixel_values))
    for index, layer in enumerate(base.encoder.layers):
        hidden = hidden + layer.self_attn(layer.layer_norm1(hidden))
        normed = layer.layer_norm2(hidden)
        probs = torch.softmax(normed @ routers[index].t(), dim=-1)
        weights, chosen = probs.topk(top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        mixed = torch.zeros_like(hidden)
        for slot in range(top_k):
            for e, source in enumerate(sources):
                expert_out, _ = source.vision_model.encoder.layers[index].mlp(normed)
                mixed = mixed + (chosen[..., slot] == e).unsqueeze(-1) * weights[..., slot, None] * expert_out
        hidden = hidden + mixed
    return base.post_layernorm(hidden[:, 0])


def test_assemble_experts_equals_reference_moe():
    sources = ffn_variants(dense_model(), 3)
    moe = assemble_experts(sources, top_k=2).eval()
    randomise_routers(moe)
    routers = [layer.mlp.router.weight for layer in moe.vision_model.encoder.layers]
    _, pixel_values = inputs()
    with torch.no_grad():
        expected = reference_vision_moe(sources, routers, pixel_values, top_k=2)
        actual = moe.vision_model(pixel_values).pooler_output
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    assert moe.config.vision_config.num_experts == 3
    experts = moe.text_model.encoder.layers[1].mlp.experts
    torch.testing.assert_close(experts.fc2.bias[2], sources[2].text_model.encoder.layers[1].mlp.fc2.bias)


def test_assemble_experts_names_the_first_differing_tensor():
    sources = ffn_variants(dense_model(), 2)
    with torch.no_grad():
        sources[1].vision_model.encoder.layers[1].self_attn.k_proj.weight[0, 0] += 0.25
    with pytest.raises(
        ValueError, match=r"vision_model\.encoder\.layers\.1\.self_attn\.k_proj\.weight.*0\.25"
    ):
        assemble_experts(sources, top_k=1)


def test_assemble_rejects_moe_inputs():
    moe = sparse_upcycle(dense_model(), num_experts=2, top_k=1)
    with pytest.raises(ValueError, match="already MoE"):
        assemble_experts([moe, moe], top_k=1)


def test_moe_layers_per_tower_and_vision_only_models():
    moe = sparse_upcycle(dense_model(), 4, 2, moe_layers={"vision": [1, 2], "text": []})
    assert moe.config.vision_config.moe_layer_indices == [1, 2]
    assert moe.config.text_config.moe_layer_indices == []
    torch.manual_seed(0)
    vision = CLIPMoEVisionModel(CLIPMoEVisionConfig(**tiny_vision_config())).eval()
    upcycled = sparse_upcycle(vision, 4, 2, moe_layers=[2]).eval()
    assert isinstance(upcycled, CLIPMoEVisionModel)
    _, pixel_values = inputs()
    with torch.no_grad():
        torch.testing.assert_close(upcycled(pixel_values).pooler_output, vision(pixel_values).pooler_output)
    with pytest.raises(ValueError, match="unknown tower"):
        moe_config(vision.config, 4, 2, {"image": [0]})


def test_assemble_from_checkpoint_directories(tiny_hf_clip_dir, tmp_path):
    from mllm_encoder.checkpoint import save_checkpoint
    from mllm_encoder.loading import load_clip_moe

    base = load_clip_moe(tiny_hf_clip_dir)
    variant = ffn_variants(base, 1)[0]
    save_checkpoint(variant, tmp_path / "stage1")
    moe = assemble_experts([tiny_hf_clip_dir, tmp_path / "stage1"], top_k=2)
    fc1 = moe.vision_model.encoder.layers[0].mlp.experts.fc1.weight
    torch.testing.assert_close(fc1[0], base.vision_model.encoder.layers[0].mlp.fc1.weight)
    torch.testing.assert_close(fc1[1], variant.vision_model.encoder.layers[0].mlp.fc1.weight)
