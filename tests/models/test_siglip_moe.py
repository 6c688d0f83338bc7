"""SigLIP-MoE equals HF SigLIP on the same weights; MoE outputs, losses, configs and Auto loading."""

import pytest
import torch
import torch.nn.functional as F
import transformers
from tiny_models import tiny_siglip_moe_config, tiny_siglip_text_config, tiny_siglip_vision_config
from transformers import AutoConfig, AutoModel, SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel

from mllm_encoder import (
    SiglipMoEConfig,
    SiglipMoEModel,
    SiglipMoEVisionConfig,
    SiglipMoEVisionModel,
)
from mllm_encoder.losses import siglip_sigmoid_loss
from mllm_encoder.moe import load_balancing_loss

ATOL = 1e-5
HF_MAJOR = int(transformers.__version__.split(".")[0])
needs_hf5 = pytest.mark.skipif(
    HF_MAJOR < 5, reason=f"transformers {transformers.__version__}: SiglipModel has no loss / no interpolation"
)


def hf_state(model: torch.nn.Module, prefix: str = "") -> dict:
    """HF weights in our layout: no ``position_ids`` buffers; a bare 5.x tower gets its ``prefix``."""
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    if prefix and not any(k.startswith(prefix) for k in state):
        state = {prefix + k: v for k, v in state.items()}
    return state


def hf_and_ours(seed: int = 0):
    torch.manual_seed(seed)
    config = SiglipConfig(vision_config=tiny_siglip_vision_config(), text_config=tiny_siglip_text_config())
    hf = SiglipModel(config).eval()
    with torch.no_grad():
        hf.logit_scale.fill_(2.3)
        hf.logit_bias.fill_(-4.0)
    ours = SiglipMoEModel(SiglipMoEConfig.from_dict(config.to_dict())).eval()
    ours.load_state_dict(hf_state(hf))  # strict: the dense layout is HF's
    return hf, ours


def hf_and_ours_vision():
    torch.manual_seed(0)
    hf = SiglipVisionModel(SiglipVisionConfig(**tiny_siglip_vision_config())).eval()
    ours = SiglipMoEVisionModel(SiglipMoEVisionConfig(**tiny_siglip_vision_config())).eval()
    ours.load_state_dict(hf_state(hf, "vision_model."))
    return hf, ours


def text_inputs():
    torch.manual_seed(3)
    input_ids = torch.randint(3, 256, (3, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    attention_mask[2, 10:] = 0
    return input_ids, attention_mask


def assert_close(actual, expected, what):
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0, msg=lambda m: f"{what}: {m}")


def reference_sigmoid_loss(logits_per_text: torch.Tensor) -> torch.Tensor:
    """The big_vision / HF 5.x formula, written out."""
    labels = 2 * torch.eye(logits_per_text.shape[0]) - 1
    return -F.logsigmoid(labels * logits_per_text).sum(dim=-1).mean()


@pytest.mark.parametrize("masked", [False, True])
def test_dense_siglip_moe_model_equals_hf_siglip(masked):
    hf, ours = hf_and_ours()
    input_ids, attention_mask = text_inputs()
    attention_mask = attention_mask if masked else None
    pixel_values = torch.randn(3, 3, 32, 32)
    kwargs = dict(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask)
    with torch.no_grad():
        expected = hf(**kwargs, output_hidden_states=True)
        actual = ours(**kwargs, output_hidden_states=True, return_loss=True)
        hf_text = hf.text_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        hf_vision = hf.vision_model(pixel_values=pixel_values, output_hidden_states=True)
    for field in ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds"):
        assert_close(getattr(actual, field), getattr(expected, field), field)
    for name, ours_tower, hf_tower in (
        ("text", actual.text_model_output, hf_text),
        ("vision", actual.vision_model_output, hf_vision),
    ):
        assert_close(ours_tower.last_hidden_state, hf_tower.last_hidden_state, f"{name} last_hidden_state")
        assert_close(ours_tower.pooler_output, hf_tower.pooler_output, f"{name} pooler_output")
        assert len(ours_tower.hidden_states) == len(hf_tower.hidden_states)
        for i, (a, e) in enumerate(zip(ours_tower.hidden_states, hf_tower.hidden_states)):
            assert_close(a, e, f"{name} hidden_states[{i}]")
    assert actual.aux_loss.item() == 0.0
    assert_close(actual.loss, reference_sigmoid_loss(expected.logits_per_text), "loss (formula)")
    if HF_MAJOR >= 5:
        with torch.no_grad():
            hf_loss = hf(**kwargs, return_loss=True).loss
        assert_close(actual.loss, hf_loss, "loss (HF)")


def test_dense_vision_model_equals_hf_siglip_vision_model():
    hf, ours = hf_and_ours_vision()
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = hf(pixel_values, output_hidden_states=True)
        actual = ours(pixel_values, output_hidden_states=True)
    assert len(actual.hidden_states) == 4, "embeddings + one state per layer"
    assert actual.last_hidden_state.shape == (2, 16, 32), "no class token"
    for i, (a, e) in enumerate(zip(actual.hidden_states, expected.hidden_states)):
        assert_close(a, e, f"hidden_states[{i}]")
    assert_close(actual.pooler_output, expected.pooler_output, "pooler_output")
    assert_close(actual.last_hidden_state, expected.last_hidden_state, "last_hidden_state")


@needs_hf5
def test_interpolated_positions_equal_hf():
    hf, ours = hf_and_ours_vision()
    pixel_values = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = hf(pixel_values, interpolate_pos_encoding=True)
        actual = ours(pixel_values, interpolate_pos_encoding=True)
    assert actual.last_hidden_state.shape == (2, 36, 32)
    assert_close(actual.pooler_output, expected.pooler_output, "pooler_output")
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        ours(pixel_values)


def test_moe_model_outputs_aux_loss_router_logits_and_loss():
    torch.manual_seed(0)
    model = SiglipMoEModel(tiny_siglip_moe_config()).eval()
    input_ids, attention_mask = text_inputs()
    with torch.no_grad():
        out = model(
            input_ids=input_ids, pixel_values=torch.randn(3, 3, 32, 32), attention_mask=attention_mask, return_loss=True
        )
    assert len(out.router_logits) == 2 + 3
    assert out.router_logits[0].shape == (3 * 12, 4) and out.router_logits[-1].shape == (3 * 16, 4)
    text_layers = [load_balancing_loss(logits, 2, attention_mask) for logits in out.router_logits[:2]]
    vision_layers = [load_balancing_loss(logits, 2) for logits in out.router_logits[2:]]
    torch.testing.assert_close(out.text_model_output.aux_loss, sum(text_layers) / 2)
    torch.testing.assert_close(out.vision_model_output.aux_loss, sum(vision_layers) / 3)
    torch.testing.assert_close(out.aux_loss, sum(text_layers + vision_layers) / 5)
    torch.testing.assert_close(out.loss, reference_sigmoid_loss(out.logits_per_text) + 0.01 * out.aux_loss)
    assert model.logit_scale.shape == (1,) and model.logit_bias.item() == -10.0  # SigLIP's initialisation


def test_sparse_model_with_one_expert_per_token_is_the_dense_ffn():
    """Every expert a copy of the dense FFN: the MoE tower equals the dense tower (gelu_pytorch_tanh experts)."""
    torch.manual_seed(0)
    dense = SiglipMoEVisionModel(SiglipMoEVisionConfig(**tiny_siglip_vision_config())).eval()
    moe = SiglipMoEVisionModel(SiglipMoEVisionConfig(**tiny_siglip_vision_config(num_experts=3, top_k=2))).eval()
    state = moe.state_dict()
    for name, tensor in dense.state_dict().items():
        if ".mlp.fc" in name and ".layers." in name:
            layer, param = name.rsplit(".mlp.", 1)
            state[f"{layer}.mlp.experts.{param}"] = tensor.unsqueeze(0).expand(3, *tensor.shape).clone()
        else:
            state[name] = tensor
    moe.load_state_dict(state)
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(moe(pixel_values).pooler_output, dense(pixel_values).pooler_output)


def test_auto_classes_save_and_reload(tmp_path):
    torch.manual_seed(0)
    model = SiglipMoEModel(tiny_siglip_moe_config()).eval()
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "siglip_moe"
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, SiglipMoEModel)
    vision = SiglipMoEVisionModel.from_pretrained(tmp_path).eval()  # the image tower out of a two-tower directory
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.vision_model(pixel_values).pooler_output
        torch.testing.assert_close(reloaded.vision_model(pixel_values).pooler_output, expected, atol=0, rtol=0)
        torch.testing.assert_close(vision(pixel_values).pooler_output, expected, atol=0, rtol=0)


def test_hf_siglip_directory_reads_as_a_dense_siglip_moe(tmp_path):
    hf, ours = hf_and_ours()
    hf.save_pretrained(tmp_path)
    config = SiglipMoEConfig.from_pretrained(tmp_path)
    assert config.vision_config.num_experts == 1 and config.vision_config.hidden_act == "gelu_pytorch_tanh"
    assert SiglipMoEVisionConfig.from_pretrained(tmp_path).image_size == 32


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(num_experts=2, top_k=3), "top_k"),
        (dict(num_experts=4, top_k=2, moe_layers=[0, 3]), "moe_layers"),
        (dict(vision_use_head="yes"), "vision_use_head"),
        (dict(patch_size=5), "patch_size"),
    ],
)
def test_invalid_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        SiglipMoEVisionConfig(**tiny_siglip_vision_config(**overrides))


def test_two_tower_config_needs_the_vision_head():
    with pytest.raises(ValueError, match="vision_use_head"):
        SiglipMoEConfig(vision_config=tiny_siglip_vision_config(vision_use_head=False))
    headless = SiglipMoEVisionModel(SiglipMoEVisionConfig(**tiny_siglip_vision_config(vision_use_head=False)))
    assert headless(torch.randn(1, 3, 32, 32)).pooler_output is None
    assert not any(name.startswith("vision_model.head.") for name in headless.state_dict())


def test_sigmoid_loss_checks_shapes_and_rewards_matches():
    with pytest.raises(ValueError, match="embeddings"):
        siglip_sigmoid_loss(torch.randn(3, 4), torch.randn(2, 4), 10.0, -10.0)
    perfect = torch.eye(4)
    good = siglip_sigmoid_loss(perfect, perfect, 10.0, -5.0)
    shuffled = siglip_sigmoid_loss(perfect, perfect.roll(1, 0), 10.0, -5.0)
    assert good.item() < 0.05 < 5.0 < shuffled.item()


def test_hf_siglip_vision_directory_loads_strictly(tmp_path):
    """An HF SiglipVisionModel directory (bare tower keys in transformers 5.x, prefixed in 4.x) loads as is."""
    from mllm_encoder.loading import load_clip_moe

    torch.manual_seed(0)
    hf = SiglipVisionModel(SiglipVisionConfig(**tiny_siglip_vision_config())).eval()
    hf.save_pretrained(tmp_path)
    ours = load_clip_moe(tmp_path).eval()
    assert isinstance(ours, SiglipMoEVisionModel)
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(ours(pixel_values).pooler_output, hf(pixel_values).pooler_output, "pooler_output")
