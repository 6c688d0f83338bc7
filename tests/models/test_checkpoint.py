"""Checkpoint directories: round trip, AutoModel, tower loading, HF CLIP layouts of transformers 4.x and 5.x."""

import json

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import tiny_vision_config
from transformers import AutoConfig, AutoModel, CLIPImageProcessor

from mllm_encoder import CLIPMoEModel, CLIPMoEVisionConfig, CLIPMoEVisionModel
from mllm_encoder.checkpoint import (
    is_clip_moe_checkpoint,
    is_clip_moe_dir,
    load_processors,
    read_config_dict,
    read_model_type,
    read_vision_config_dict,
    tensor_names,
)
from mllm_encoder.loading import load_clip_moe


def test_round_trip_through_automodel(tiny_clip_moe_dir):
    files = {p.name for p in tiny_clip_moe_dir.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer_config.json"} <= files
    assert json.loads((tiny_clip_moe_dir / "config.json").read_text())["model_type"] == "clip_moe"
    assert isinstance(AutoConfig.from_pretrained(tiny_clip_moe_dir).vision_config, CLIPMoEVisionConfig)
    model = AutoModel.from_pretrained(tiny_clip_moe_dir).eval()
    assert isinstance(model, CLIPMoEModel)
    torch.manual_seed(0)
    reference = CLIPMoEModel(model.config).eval()  # the fixture's weights come from seed 0 too
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    image_processor, tokenizer = load_processors(tiny_clip_moe_dir)
    assert image_processor.crop_size["height"] == 32 and tokenizer.model_max_length == 16


def test_vision_model_loads_from_full_checkpoint(tiny_clip_moe_dir):
    full = CLIPMoEModel.from_pretrained(tiny_clip_moe_dir).eval()
    vision = CLIPMoEVisionModel.from_pretrained(tiny_clip_moe_dir).eval()
    assert vision.config.num_experts == 4
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vision(pixel_values).pooler_output, full.vision_model(pixel_values).pooler_output)
    assert isinstance(AutoModel.from_pretrained(tiny_clip_moe_dir), CLIPMoEModel)


def test_hf_clip_directory_loads_as_dense_clip_moe(tiny_hf_clip_dir):
    from transformers import CLIPModel

    hf = CLIPModel.from_pretrained(tiny_hf_clip_dir).eval()
    ours = CLIPMoEModel.from_pretrained(tiny_hf_clip_dir).eval()
    assert ours.config.vision_config.num_experts == 1 and ours.config.text_config.top_k == 1
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = hf.visual_projection(hf.vision_model(pixel_values).pooler_output)
        torch.testing.assert_close(ours.get_image_features(pixel_values), expected, atol=1e-5, rtol=0)


def write_hf_vision_checkpoint(path, state, extra_config=None):
    """An HF CLIPVisionModel directory with the given key layout (written by hand, any transformers)."""
    path.mkdir()
    config = dict(tiny_vision_config(), model_type="clip_vision_model", architectures=["CLIPVisionModel"])
    config.update(extra_config or {})
    (path / "config.json").write_text(json.dumps(config))
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(path / "model.safetensors"),
        metadata={"format": "pt"},
    )
    CLIPImageProcessor().save_pretrained(path)


def test_hf_vision_checkpoints_of_both_transformers_layouts(tmp_path):
    torch.manual_seed(0)
    reference = CLIPMoEVisionModel(CLIPMoEVisionConfig(**tiny_vision_config())).eval()
    prefixed = dict(reference.state_dict())
    prefixed["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    bare = {k[len("vision_model.") :]: v for k, v in reference.state_dict().items()}
    write_hf_vision_checkpoint(tmp_path / "v4", prefixed, {"top_k": 50})
    write_hf_vision_checkpoint(tmp_path / "v5", bare)
    pixel_values = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = reference(pixel_values).pooler_output
        for layout in ("v4", "v5"):
            loaded = load_clip_moe(tmp_path / layout).eval()
            assert loaded.config.top_k == 1, "HF's generation default top_k=50 is not an MoE setting"
            torch.testing.assert_close(loaded(pixel_values).pooler_output, expected, msg=layout)


def test_the_format_functions_read_configs_and_tensor_names(tiny_clip_moe_dir, tiny_hf_clip_dir, tmp_path):
    assert read_model_type(tiny_clip_moe_dir) == "clip_moe" and read_model_type(tiny_hf_clip_dir) == "clip"
    vision = read_vision_config_dict(tiny_clip_moe_dir)
    assert vision == read_config_dict(tiny_clip_moe_dir)["vision_config"] and vision["num_experts"] == 4
    assert is_clip_moe_dir(tiny_clip_moe_dir) and is_clip_moe_checkpoint(tiny_clip_moe_dir)
    assert not is_clip_moe_dir(tiny_hf_clip_dir) and not is_clip_moe_dir(tmp_path / "missing")
    model = CLIPMoEModel.from_pretrained(tiny_clip_moe_dir)
    names = tensor_names(tiny_clip_moe_dir / "model.safetensors")
    assert names == set(model.state_dict())
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    assert tensor_names(tmp_path / "pytorch_model.bin") == names
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(names, "a")}))
    assert tensor_names(tmp_path / "model.safetensors.index.json") == names
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'}: not valid JSON"):
        read_config_dict(tmp_path)
    assert not is_clip_moe_dir(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json: expected a JSON object, found list"):
        read_model_type(tmp_path)


def test_family_name_and_the_image_processor_a_checkpoint_gets_by_default(tiny_clip_moe_dir, tmp_path):
    from tiny_models import tiny_siglip_vision_config

    from mllm_encoder import SiglipMoEVisionConfig, SiglipMoEVisionModel
    from mllm_encoder.checkpoint import load_image_processor, save_checkpoint
    from mllm_encoder.families import family_name

    names = {
        "clip": "clip", "clip_vision_model": "clip", "clip_moe_text_model": "clip", None: "clip", "": "clip",
        "siglip": "siglip", "siglip_moe_vision_model": "siglip", "siglip2": "siglip2", "siglip2_moe": "siglip2",
        "siglip2_vision_model": "siglip2", "llava": "clip",
    }  # fmt: skip
    assert {model_type: family_name(model_type) for model_type in names} == names
    save_checkpoint(CLIPMoEModel.from_pretrained(tiny_clip_moe_dir), tmp_path / "clip")
    assert type(load_image_processor(tmp_path / "clip")).__name__ == "CLIPImageProcessor"
    save_checkpoint(SiglipMoEVisionModel(SiglipMoEVisionConfig(**tiny_siglip_vision_config())), tmp_path / "siglip")
    processor = load_image_processor(tmp_path / "siglip")
    assert type(processor).__name__ == "SiglipImageProcessor" and processor.size == {"height": 32, "width": 32}
