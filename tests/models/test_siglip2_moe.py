"""SigLIP 2-MoE (NaFlex) equals HF Siglip2Model on the same weights, on fixed-resolution and NaFlex inputs."""

import pytest
import torch
import transformers
from tiny_models import tiny_siglip_text_config

from mllm_encoder import Siglip2MoEConfig, Siglip2MoEModel, Siglip2MoEVisionConfig, Siglip2MoEVisionModel
from mllm_encoder.upcycle import sparse_upcycle

ATOL = 1e-5
needs_hf_siglip2 = pytest.mark.skipif(
    not hasattr(transformers, "Siglip2Model"),
    reason=f"transformers {transformers.__version__} has no Siglip2Model (HF's SigLIP 2 NaFlex reference)",
)


def tiny_siglip2_vision_config(**overrides) -> dict:
    """3 layers, 8x8 patches, a 4x4 learned position grid (16 positions)."""
    config = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, patch_size=8, num_patches=16
    )
    config.update(overrides)
    return config


def fixed_resolution_inputs(batch: int = 3):
    """Every image 32x32: a full 4x4 patch grid, no padding."""
    torch.manual_seed(5)
    pixel_values = torch.randn(batch, 16, 3 * 8 * 8)
    return pixel_values, torch.ones(batch, 16, dtype=torch.long), torch.tensor([[4, 4]] * batch)


def naflex_inputs():
    """Three aspect ratios in one batch of 20 patch rows: 4x5 (upsampled grid), 2x6 and 3x3 (padded)."""
    torch.manual_seed(6)
    shapes = torch.tensor([[4, 5], [2, 6], [3, 3]])
    mask = torch.zeros(3, 20, dtype=torch.long)
    for row, (height, width) in enumerate(shapes.tolist()):
        mask[row, : height * width] = 1
    return torch.randn(3, 20, 3 * 8 * 8), mask, shapes


def hf_and_ours():
    torch.manual_seed(0)
    config = transformers.Siglip2Config(
        vision_config=tiny_siglip2_vision_config(), text_config=tiny_siglip_text_config()
    )
    hf = transformers.Siglip2Model(config).eval()
    with torch.no_grad():
        hf.logit_scale.fill_(2.3)
        hf.logit_bias.fill_(-4.0)
    ours = Siglip2MoEModel(Siglip2MoEConfig.from_dict(config.to_dict())).eval()
    ours.load_state_dict({k: v for k, v in hf.state_dict().items() if not k.endswith("position_ids")})
    return hf, ours


def assert_close(actual, expected, what):
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0, msg=lambda m: f"{what}: {m}")


@needs_hf_siglip2
@pytest.mark.parametrize("make_inputs", [fixed_resolution_inputs, naflex_inputs], ids=["fixed", "naflex"])
def test_dense_siglip2_moe_equals_hf_siglip2(make_inputs):
    hf, ours = hf_and_ours()
    pixel_values, pixel_attention_mask, spatial_shapes = make_inputs()
    torch.manual_seed(3)
    input_ids = torch.randint(3, 256, (3, 12))
    kwargs = dict(
        input_ids=input_ids,
        pixel_values=pixel_values,
        pixel_attention_mask=pixel_attention_mask,
        spatial_shapes=spatial_shapes,
        return_loss=True,
    )
    with torch.no_grad():
        expected = hf(**kwargs)
        actual = ours(**kwargs, output_hidden_states=True)
        hf_vision = hf.vision_model(
            pixel_values=pixel_values,
            pixel_attention_mask=pixel_attention_mask,
            spatial_shapes=spatial_shapes,
            output_hidden_states=True,
        )
    for field in ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds", "loss"):
        assert_close(getattr(actual, field), getattr(expected, field), field)
    vision = actual.vision_model_output
    assert_close(vision.pooler_output, hf_vision.pooler_output, "pooler_output")
    assert_close(vision.last_hidden_state, hf_vision.last_hidden_state, "last_hidden_state")
    assert len(vision.hidden_states) == len(hf_vision.hidden_states) == 4
    for i, (a, e) in enumerate(zip(vision.hidden_states, hf_vision.hidden_states)):
        assert_close(a, e, f"hidden_states[{i}]")


@needs_hf_siglip2
def test_vision_tower_equals_hf_siglip2_vision_model():
    torch.manual_seed(0)
    hf = transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(**tiny_siglip2_vision_config())).eval()
    ours = Siglip2MoEVisionModel(Siglip2MoEVisionConfig(**tiny_siglip2_vision_config())).eval()
    state = {k: v for k, v in hf.state_dict().items() if not k.endswith("position_ids")}
    ours.load_state_dict({("" if k.startswith("vision_model.") else "vision_model.") + k: v for k, v in state.items()})
    pixel_values, mask, shapes = naflex_inputs()
    with torch.no_grad():
        expected = hf(pixel_values=pixel_values, pixel_attention_mask=mask, spatial_shapes=shapes)
        actual = ours(pixel_values, pixel_attention_mask=mask, spatial_shapes=shapes)
    assert_close(actual.pooler_output, expected.pooler_output, "pooler_output")


def test_upcycled_siglip2_equals_dense_and_padding_does_not_route():
    """Runs without HF Siglip2 too: our NaFlex tower is self-contained."""
    torch.manual_seed(0)
    dense = Siglip2MoEVisionModel(Siglip2MoEVisionConfig(**tiny_siglip2_vision_config())).eval()
    moe = sparse_upcycle(dense, num_experts=4, top_k=2).eval()
    assert isinstance(moe, Siglip2MoEVisionModel)
    pixel_values, mask, shapes = naflex_inputs()
    with torch.no_grad():
        expected = dense(pixel_values, pixel_attention_mask=mask, spatial_shapes=shapes).pooler_output
        out = moe(pixel_values, pixel_attention_mask=mask, spatial_shapes=shapes, output_aux_loss=True)
        padded = pixel_values.clone()
        padded[mask == 0] = 100.0  # what sits in the padding changes nothing
        again = moe(padded, pixel_attention_mask=mask, spatial_shapes=shapes, output_aux_loss=True)
    torch.testing.assert_close(out.pooler_output, expected, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(again.pooler_output, out.pooler_output, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(again.aux_loss, out.aux_loss)  # padding rows do not count in the balance


def test_naflex_inputs_are_checked():
    model = Siglip2MoEVisionModel(Siglip2MoEVisionConfig(**tiny_siglip2_vision_config()))
    pixel_values, mask, shapes = fixed_resolution_inputs(1)
    with pytest.raises(ValueError, match="spatial_shapes"):
        model(pixel_values)
    with pytest.raises(ValueError, match="does not fit"):
        model(pixel_values, pixel_attention_mask=mask, spatial_shapes=torch.tensor([[5, 4]]))
    with pytest.raises(ValueError, match="square"):
        Siglip2MoEVisionConfig(**tiny_siglip2_vision_config(num_patches=12))


@needs_hf_siglip2
def test_hf_siglip2_directory_loads_as_a_dense_siglip2_moe(tmp_path):
    from mllm_encoder.loading import load_clip_moe

    hf, _ = hf_and_ours()
    hf.save_pretrained(tmp_path)
    ours = load_clip_moe(tmp_path).eval()
    assert isinstance(ours, Siglip2MoEModel) and ours.config.vision_config.num_patches == 16
    pixel_values, mask, shapes = naflex_inputs()
    with torch.no_grad():
        expected = hf.vision_model(pixel_values=pixel_values, pixel_attention_mask=mask, spatial_shapes=shapes)
        actual = ours.vision_model(pixel_values, pixel_attention_mask=mask, spatial_shapes=shapes)
    assert_close(actual.pooler_output, expected.pooler_output, "pooler_output")
