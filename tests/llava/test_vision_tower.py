"""CLIPMoEVisionTower: LLaVA's tower contract, equality with LLaVA's CLIPVisionTower, training behaviour."""

from types import SimpleNamespace

import pytest
import torch

from mllm_encoder.checkpoint import read_checkpoint_tensors
from mllm_encoder.vision_tower import CLIPMoEVisionTower


def tower_args(select_layer=-2, select_feature="patch", **extra):
    return SimpleNamespace(mm_vision_select_layer=select_layer, mm_vision_select_feature=select_feature, **extra)


@pytest.fixture(scope="module")
def images():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(3, 3, 32, 32, generator=generator)


@pytest.mark.parametrize("select_feature", ["patch", "cls_patch"])
@pytest.mark.parametrize("select_layer", [-1, -2, -3, -4, 0, 1, 2, 3])
def test_equals_llava_clip_tower_on_dense_checkpoint(tiny_hf_clip_dir, images, select_layer, select_feature):
    from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower

    args = tower_args(select_layer, select_feature)
    reference = CLIPVisionTower(str(tiny_hf_clip_dir), args=args).eval()
    ours = CLIPMoEVisionTower(f"clip-moe:{tiny_hf_clip_dir}", args=args, source=str(tiny_hf_clip_dir)).eval()
    expected, actual = reference(images), ours(images)
    tokens = 16 if select_feature == "patch" else 17
    assert actual.shape == expected.shape == (3, tokens, 32)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    listed_expected, listed = reference(list(images)), ours(list(images))
    assert len(listed) == 3 and listed[0].shape == (1, tokens, 32)
    for got, want in zip(listed, listed_expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_contract_attributes(tiny_clip_moe_dir, images):
    tower = CLIPMoEVisionTower("clip-moe", args=tower_args(), source=str(tiny_clip_moe_dir))
    assert tower.is_loaded and tower.hidden_size == 32 and tower.image_size == 32
    assert tower.num_patches_per_side == 4 and tower.num_patches == 16
    assert tower.config.patch_size == 8 and tower.config.num_hidden_layers == 3
    assert tower.dummy_feature.shape == (1, 32) and tower.device.type == "cpu"
    processor = tower.image_processor
    assert processor.crop_size["height"] == 32 and processor.size["shortest_edge"] == 32
    assert len(processor.image_mean) == 3
    tower.to(dtype=torch.float16)
    assert tower.dtype == torch.float16
    features = tower(images)  # float32 in, float32 out, computed in float16
    assert features.dtype == torch.float32 and features.shape == (3, 16, 32)


def test_only_layers_up_to_select_layer_are_built(tiny_clip_moe_dir):
    tower = CLIPMoEVisionTower("clip-moe", args=tower_args(-2), source=str(tiny_clip_moe_dir))
    assert len(tower.vision_tower.vision_model.encoder.layers) == 2
    names = set(tower.vision_tower.state_dict())
    assert not any(".layers.2." in name or "post_layernorm" in name for name in names)
    source = read_checkpoint_tensors(tiny_clip_moe_dir, "vision_model.")
    for name, tensor in tower.vision_tower.state_dict().items():
        assert torch.equal(tensor, source[name]), name


def test_frozen_by_default_runs_without_grad(tiny_clip_moe_dir, images):
    tower = CLIPMoEVisionTower("clip-moe", args=tower_args(), source=str(tiny_clip_moe_dir))
    assert not any(p.requires_grad for p in tower.parameters())
    outputs = []
    tower.vision_tower.register_forward_hook(lambda module, args, output: outputs.append(output))
    features = tower(images.requires_grad_(False))
    assert not features.requires_grad and outputs[0].aux_loss is None


def test_unfrozen_tower_trains_and_its_encoder_returns_the_aux_loss(tiny_clip_moe_dir, images):
    args = tower_args(unfreeze_mm_vision_tower=True)
    tower = CLIPMoEVisionTower("clip-moe", args=args, source=str(tiny_clip_moe_dir))
    outputs = []
    tower.vision_tower.register_forward_hook(lambda module, args, output: outputs.append(output))
    features = tower(images)
    assert features.requires_grad
    reference = tower.vision_tower(images, output_hidden_states=True)
    torch.testing.assert_close(outputs[0].aux_loss, reference.aux_loss)
    (features.sum() + outputs[0].aux_loss).backward()
    router = tower.vision_tower.vision_model.encoder.layers[0].mlp.router.weight
    assert router.grad is not None and router.grad.abs().sum() > 0
    outputs.clear()
    with torch.no_grad():  # inference under no_grad computes no aux loss
        tower(images)
    assert outputs[0].aux_loss is None


def test_rebuilds_from_saved_llava_config_without_checkpoint_dir(tiny_clip_moe_dir, images):
    tower = CLIPMoEVisionTower("clip-moe", args=tower_args(), source=str(tiny_clip_moe_dir))
    saved = tower_args(**tower.export_llava_config())
    assert saved.mm_vision_num_experts == 4 and saved.mm_vision_top_k == 2
    rebuilt = CLIPMoEVisionTower("clip-moe", args=saved, delay_load=True, source="/nonexistent/clip-moe")
    assert rebuilt.is_loaded  # parameters exist, so from_pretrained can fill them
    rebuilt.load_state_dict(tower.state_dict())
    torch.testing.assert_close(rebuilt(images), tower(images))
    with pytest.raises(ValueError, match="/nonexistent/clip-moe"):
        rebuilt.load_source_weights()


@pytest.mark.parametrize(
    "args, message",
    [
        (tower_args(select_layer=-5), "mm_vision_select_layer=-5"),
        (tower_args(select_layer=4), "mm_vision_select_layer=4"),
        (tower_args(select_feature="cls"), "mm_vision_select_feature"),
    ],
)
def test_bad_arguments_raise(tiny_clip_moe_dir, args, message):
    with pytest.raises(ValueError, match=message):
        CLIPMoEVisionTower("clip-moe", args=args, source=str(tiny_clip_moe_dir))


def test_missing_checkpoint_raises(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        CLIPMoEVisionTower("clip-moe", args=tower_args(), source=str(tmp_path))


@pytest.mark.parametrize("layout", ["sharded-safetensors", "safetensors", "bin"])
def test_read_checkpoint_tensors_filters_by_prefix(layout, tmp_path):
    import json

    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(2, 3, generator=generator) for name in ("vision_model.a", "vision_model.b", "text.c")}
    if layout == "sharded-safetensors":
        shards = {"shard-1.safetensors": ["vision_model.a", "text.c"], "shard-2.safetensors": ["vision_model.b"]}
        for file, names in shards.items():
            save_file({name: tensors[name] for name in names}, str(tmp_path / file))
        weight_map = {name: file for file, names in shards.items() for name in names}
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    elif layout == "safetensors":
        save_file(tensors, str(tmp_path / "model.safetensors"))
    else:
        torch.save(tensors, tmp_path / "pytorch_model.bin")
    vision = read_checkpoint_tensors(tmp_path, prefix="vision_model.")
    assert sorted(vision) == ["vision_model.a", "vision_model.b"]
    assert all(torch.equal(vision[name], tensors[name]) for name in vision)
    assert sorted(read_checkpoint_tensors(tmp_path)) == sorted(tensors)
    with pytest.raises(ValueError, match="no weights found"):
        read_checkpoint_tensors(tmp_path / "missing")
