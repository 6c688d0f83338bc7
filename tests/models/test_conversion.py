"""Converted weights reproduce the source models: a reference OpenAI-layout CLIP-MoE written here,
open_clip's own CLIP, and timm's own ViT."""

import pytest
import torch
from tiny_models import REFERENCE_EMBED as EMBED
from tiny_models import REFERENCE_HEADS as HEADS
from tiny_models import REFERENCE_WIDTH as WIDTH
from tiny_models import ReferenceOpenAICLIPMoE
from torch import nn

from mllm_encoder import CLIPMoEModel, CLIPMoEVisionModel
from mllm_encoder.conversion import convert_openai_clip, convert_timm_clip_vit
from mllm_encoder.conversion.convert import convert_checkpoint, read_state_dict
from mllm_encoder.loading import load_clip_moe


def sample_inputs(context=24):
    torch.manual_seed(11)
    text = torch.randint(1, 49000, (3, context))
    for row, eot in enumerate((23, 12, 5)):
        text[row, eot] = 49407
        text[row, eot + 1 :] = 0
    return torch.randn(2, 3, 32, 32), text


@pytest.mark.parametrize("long_clip", [True, False])
def test_official_clip_moe_conversion_reproduces_the_reference(long_clip):
    torch.manual_seed(0)
    reference = ReferenceOpenAICLIPMoE(long_clip=long_clip).eval()
    config, state_dict = convert_openai_clip(reference.state_dict(), top_k=2)
    assert config.vision_config.moe_layers == [1, 2] and config.vision_config.num_experts == 4
    assert config.text_config.max_position_embeddings == 24 and config.vision_config.image_size == 32
    model = CLIPMoEModel(config).eval()
    model.load_state_dict(state_dict, strict=True)
    pixel_values, text = sample_inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            model.get_image_features(pixel_values), reference.encode_image(pixel_values), atol=1e-4, rtol=0
        )
        torch.testing.assert_close(model.get_text_features(text), reference.encode_text(text), atol=1e-4, rtol=0)


def test_conversion_rejects_unconverted_tensors():
    state_dict = ReferenceOpenAICLIPMoE(num_experts=0, moe_last=0, long_clip=False).state_dict()
    state_dict["visual.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="visual.extra.weight"):
        convert_openai_clip(state_dict)


def test_open_clip_model_converts_exactly(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    reference = open_clip.model.CLIP(
        embed_dim=EMBED,
        vision_cfg=open_clip.model.CLIPVisionCfg(layers=2, width=WIDTH, patch_size=8, image_size=32),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=16, vocab_size=49408, width=WIDTH, heads=HEADS, layers=2),
        quick_gelu=True,
    ).eval()
    torch.save({"state_dict": {"module." + k: v for k, v in reference.state_dict().items()}}, tmp_path / "oc.pt")
    convert_checkpoint(tmp_path / "oc.pt", tmp_path / "converted", "openai")
    model = load_clip_moe(tmp_path / "converted").eval()
    assert isinstance(model, CLIPMoEModel) and model.config.vision_config.num_experts == 1
    text = open_clip.get_tokenizer("ViT-B-32", context_length=16)(["a striped red circle", "a dog"])
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            model.get_image_features(pixel_values), reference.encode_image(pixel_values), atol=1e-4, rtol=0
        )
        torch.testing.assert_close(model.get_text_features(text), reference.encode_text(text), atol=1e-4, rtol=0)
    from mllm_encoder.checkpoint import load_processors

    _, tokenizer = load_processors(tmp_path / "converted")
    ids = tokenizer(["a striped red circle"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    assert ids[0, :6].tolist() == text[0, :6].tolist()


def timm_reference():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32,
        patch_size=8,
        embed_dim=WIDTH,
        depth=2,
        num_heads=HEADS,
        pre_norm=True,
        norm_layer=nn.LayerNorm,
        act_layer="quick_gelu",
        num_classes=EMBED,
        global_pool="token",
    ).eval()


def test_timm_clip_vit_converts_exactly(tmp_path):
    reference = timm_reference()
    config, state_dict = convert_timm_clip_vit(reference.state_dict())
    model = CLIPMoEVisionModel(config).eval()
    model.load_state_dict(state_dict, strict=True)
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = reference.forward_features(pixel_values)
        pooled = reference.forward_head(features, pre_logits=True)
        ours = model(pixel_values, output_hidden_states=True)
        torch.testing.assert_close(ours.pooler_output, pooled, atol=1e-4, rtol=0)
        block_out = reference.blocks[0](reference.norm_pre(reference._pos_embed(reference.patch_embed(pixel_values))))
        torch.testing.assert_close(ours.hidden_states[1], block_out, atol=1e-4, rtol=0)


def test_timm_conversion_with_upcycling_through_files(tmp_path):
    from safetensors.torch import save_file

    reference = timm_reference()
    save_file(reference.state_dict(), str(tmp_path / "vit.safetensors"))
    convert_checkpoint(tmp_path / "vit.safetensors", tmp_path / "moe", "timm", top_k=2, num_experts=4)
    model = load_clip_moe(tmp_path / "moe").eval()
    assert isinstance(model, CLIPMoEVisionModel) and model.config.moe_layer_indices == [0, 1]
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled = reference.forward_head(reference.forward_features(pixel_values), pre_logits=True)
        torch.testing.assert_close(model(pixel_values).pooler_output, pooled, atol=1e-4, rtol=0)


def test_read_state_dict_refuses_pickled_code(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(ValueError, match="weights-only"):
        read_state_dict(tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="no weights found"):
        read_state_dict(tmp_path / "missing")
