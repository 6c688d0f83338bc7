"""Sparse upcycling equals the dense model and assembled experts equal a hand-written MoE, for CLIP and SigLIP;
assembling from checkpoint directories (HF CLIP, HF SigLIP) and the CLI on an HF SigLIP directory."""

import json

import pytest
import torch
from tiny_models import tiny_clip_moe_config, tiny_siglip_moe_config, tiny_siglip_text_config, tiny_siglip_vision_config
from transformers import SiglipConfig, SiglipModel

from mllm_encoder import CLIPMoEVisionModel, SiglipMoEModel, SiglipMoEVisionModel
from mllm_encoder.checkpoint import save_checkpoint
from mllm_encoder.families import FAMILIES
from mllm_encoder.loading import load_clip_moe
from mllm_encoder.upcycle import assemble_experts, moe_config, sparse_upcycle

ATOL = 1e-5
TINY_CONFIG = {"clip": tiny_clip_moe_config, "siglip": tiny_siglip_moe_config}
# Each family's image tower around its encoder layers: the first layer's input from the pixels, and the pooled
# output from the last layer's output.
VISION_ENDS = {
    "clip": (
        lambda tower, pixels: tower.pre_layrnorm(tower.embeddings(pixels)),
        lambda tower, h: tower.post_layernorm(h[:, 0]),
    ),
    "siglip": (lambda tower, pixels: tower.embeddings(pixels), lambda tower, h: tower.head(tower.post_layernorm(h))),
}
family_names = pytest.mark.parametrize("family", sorted(TINY_CONFIG))


def dense_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    return FAMILIES[family].model(TINY_CONFIG[family](num_experts=1, top_k=1)).eval()


def ffn_variants(base, n: int):
    """``n`` copies of ``base`` whose encoder-layer FFNs (only) are perturbed differently, as after MCL stages."""
    models = []
    for i in range(n):
        model = type(base)(base.config).eval()
        model.load_state_dict(base.state_dict())
        generator = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".layers." in name and ".mlp." in name:
                    param.add_(0.5 * torch.randn(param.shape, generator=generator))
        models.append(model)
    return models


def inputs(family: str):
    """Token ids (CLIP's: ending in the end-of-text token) and 32x32 images."""
    torch.manual_seed(7)
    if family == "clip":
        input_ids = torch.randint(1, 40000, (2, 10))
        input_ids[:, -1] = 49407
    else:
        input_ids = torch.randint(3, 256, (2, 10))
    return input_ids, torch.randn(2, 3, 32, 32)


def randomise_routers(model):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("router.weight"):
                param.normal_(std=3.0)


@family_names
@pytest.mark.parametrize("top_k", [1, 2])
def test_sparse_upcycle_equals_dense(family, top_k):
    dense = dense_model(family)
    moe = sparse_upcycle(dense, num_experts=4, top_k=top_k).eval()
    assert type(moe) is type(dense)
    randomise_routers(moe)
    input_ids, pixel_values = inputs(family)
    with torch.no_grad():
        expected = dense(input_ids=input_ids, pixel_values=pixel_values, output_hidden_states=True, return_loss=True)
        actual = moe(input_ids=input_ids, pixel_values=pixel_values, output_hidden_states=True, return_loss=True)
    assert len(actual.router_logits) == 5
    for field in ("logits_per_image", "image_embeds", "text_embeds"):
        torch.testing.assert_close(getattr(actual, field), getattr(expected, field), atol=ATOL, rtol=ATOL)
    for tower in ("vision_model_output", "text_model_output"):
        for e, a in zip(getattr(expected, tower).hidden_states, getattr(actual, tower).hidden_states):
            torch.testing.assert_close(a, e, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(moe.logit_scale, dense.logit_scale, atol=0, rtol=0)


def reference_vision_moe(family, sources, routers, pixel_values, top_k):
    """The MoE image tower written out by hand from the dense source models' own modules."""
    embed, pool = VISION_ENDS[family]
    base = sources[0].vision_model
    hidden = embed(base, pixel_values)
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
    return pool(base, hidden)


@family_names
def test_assemble_experts_equals_reference_moe(family):
    sources = ffn_variants(dense_model(family), 3)
    moe = assemble_experts(sources, top_k=2).eval()
    randomise_routers(moe)
    routers = [layer.mlp.router.weight for layer in moe.vision_model.encoder.layers]
    _, pixel_values = inputs(family)
    with torch.no_grad():
        expected = reference_vision_moe(family, sources, routers, pixel_values, top_k=2)
        actual = moe.vision_model(pixel_values).pooler_output
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=ATOL)
    assert moe.config.vision_config.num_experts == 3 and moe.config.text_config.num_experts == 3
    experts = moe.text_model.encoder.layers[1].mlp.experts
    torch.testing.assert_close(experts.fc2.bias[2], sources[2].text_model.encoder.layers[1].mlp.fc2.bias)


@pytest.mark.parametrize(
    "family, tensor",
    [
        ("clip", "vision_model.encoder.layers.1.self_attn.k_proj.weight"),
        ("siglip", "vision_model.encoder.layers.1.self_attn.k_proj.weight"),
        # SigLIP's pooling-head MLP is shared, not an FFN to assemble: a difference there is refused too.
        ("siglip", "vision_model.head.mlp.fc1.weight"),
        ("siglip", "logit_bias"),
    ],
)
def test_assemble_experts_names_the_first_differing_tensor(family, tensor):
    sources = ffn_variants(dense_model(family), 2)
    with torch.no_grad():
        sources[1].get_parameter(tensor).view(-1)[0] += 0.25
    with pytest.raises(ValueError, match=rf"differs from model 0 at {tensor.replace('.', '[.]')} .*0\.25"):
        assemble_experts(sources, top_k=1)


@family_names
def test_assemble_rejects_moe_inputs(family):
    moe = sparse_upcycle(dense_model(family), num_experts=2, top_k=1)
    with pytest.raises(ValueError, match="already MoE"):
        assemble_experts([moe, moe], top_k=1)


@family_names
def test_vision_only_upcycle_and_family_mismatch(family):
    torch.manual_seed(0)
    vision_class = FAMILIES[family].vision_model
    vision = vision_class(TINY_CONFIG[family](num_experts=1, top_k=1).vision_config).eval()
    upcycled = sparse_upcycle(vision, 4, 2, moe_layers=[0, 2]).eval()
    assert type(upcycled) is vision_class
    assert upcycled.config.moe_layer_indices == [0, 2]
    _, pixel_values = inputs(family)
    with torch.no_grad():
        torch.testing.assert_close(upcycled(pixel_values).pooler_output, vision(pixel_values).pooler_output)
    dense = dense_model(family)
    with pytest.raises(ValueError, match=f"model 1 is a {type(dense).__name__}"):
        assemble_experts([vision, dense], top_k=1)


def test_moe_layers_per_tower():
    moe = sparse_upcycle(dense_model("clip"), 4, 2, moe_layers={"vision": [1, 2], "text": []})
    assert moe.config.vision_config.moe_layer_indices == [1, 2]
    assert moe.config.text_config.moe_layer_indices == []
    with pytest.raises(ValueError, match="unknown tower"):
        moe_config(moe.config.vision_config, 4, 2, {"image": [0]})


def test_assemble_from_checkpoint_directories(tiny_hf_clip_dir, tmp_path):
    base = load_clip_moe(tiny_hf_clip_dir)
    variant = ffn_variants(base, 1)[0]
    save_checkpoint(variant, tmp_path / "stage1")
    moe = assemble_experts([tiny_hf_clip_dir, tmp_path / "stage1"], top_k=2)
    fc1 = moe.vision_model.encoder.layers[0].mlp.experts.fc1.weight
    torch.testing.assert_close(fc1[0], base.vision_model.encoder.layers[0].mlp.fc1.weight)
    torch.testing.assert_close(fc1[1], variant.vision_model.encoder.layers[0].mlp.fc1.weight)


def test_assemble_from_hf_siglip_directories(tmp_path):
    """An HF SiglipModel directory and a saved SigLIP-MoE-layout stage model assemble into experts."""
    torch.manual_seed(1)
    hf = SiglipModel(SiglipConfig(vision_config=tiny_siglip_vision_config(), text_config=tiny_siglip_text_config()))
    hf.save_pretrained(tmp_path / "hf")
    base = load_clip_moe(tmp_path / "hf")
    assert isinstance(base, SiglipMoEModel)
    torch.testing.assert_close(base.logit_bias, hf.logit_bias, atol=0, rtol=0)
    variant = ffn_variants(base, 1)[0]
    save_checkpoint(variant, tmp_path / "stage1")
    processor = json.loads((tmp_path / "stage1" / "preprocessor_config.json").read_text())
    assert processor["image_processor_type"] == "SiglipImageProcessor"  # the family's default, no crop
    moe = assemble_experts([tmp_path / "hf", tmp_path / "stage1"], top_k=2)
    fc1 = moe.vision_model.encoder.layers[0].mlp.experts.fc1.weight
    torch.testing.assert_close(fc1[0], hf.vision_model.encoder.layers[0].mlp.fc1.weight, atol=0, rtol=0)
    torch.testing.assert_close(fc1[1], variant.vision_model.encoder.layers[0].mlp.fc1.weight, atol=0, rtol=0)
    vision = load_clip_moe(tmp_path / "stage1", SiglipMoEVisionModel)  # the image tower out of a two-tower dir
    assert isinstance(vision, SiglipMoEVisionModel)
    with pytest.raises(ValueError, match="has no CLIPMoEVisionModel in it"):
        load_clip_moe(tmp_path / "stage1", CLIPMoEVisionModel)


def test_cli_upcycle_assemble_inspect_on_an_hf_siglip_directory(tmp_path, capsys):
    from transformers import SiglipImageProcessor

    from mllm_encoder.cli import main

    torch.manual_seed(2)
    hf = SiglipModel(SiglipConfig(vision_config=tiny_siglip_vision_config(), text_config=tiny_siglip_text_config()))
    hf.save_pretrained(tmp_path / "hf")
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "hf")
    main(["upcycle", str(tmp_path / "hf"), str(tmp_path / "moe"), "--num-experts", "4", "--text-moe-layers", ""])
    model = load_clip_moe(tmp_path / "moe")
    assert isinstance(model, SiglipMoEModel)
    assert (
        model.config.vision_config.moe_layer_indices == [0, 1, 2] and model.config.text_config.moe_layer_indices == []
    )
    processor = json.loads((tmp_path / "moe" / "preprocessor_config.json").read_text())
    assert processor["image_processor_type"] == "SiglipImageProcessor" and "crop_size" not in processor
    assert processor["image_mean"] == [0.5, 0.5, 0.5] and processor["size"] == {"height": 32, "width": 32}
    capsys.readouterr()
    main(["inspect", str(tmp_path / "moe"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["config"]["model_type"] == "siglip_moe"
    assert report["towers"]["vision"]["experts_per_layer"] == [4, 4, 4]
    assert report["parameters"] == sum(p.numel() for p in model.parameters())
    main(["assemble", str(tmp_path / "hf"), str(tmp_path / "hf"), "--out", str(tmp_path / "assembled"), "--top-k", "1"])
    experts = load_clip_moe(tmp_path / "assembled").vision_model.encoder.layers[2].mlp.experts.fc2.weight
    torch.testing.assert_close(experts[1], hf.vision_model.encoder.layers[2].mlp.fc2.weight, atol=0, rtol=0)
