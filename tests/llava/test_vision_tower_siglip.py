"""The LLaVA tower over SigLIP / SigLIP-MoE checkpoints: no class token to drop, SigLIP's processor, round trip.

transformers' own Llava with a SigLIP-MoE tower is tested in ``test_hf_llava.py``."""

import json
from types import SimpleNamespace

import pytest
import torch
from tiny_models import tiny_siglip_text_config, tiny_siglip_vision_config
from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

from mllm_encoder.checkpoint import save_checkpoint
from mllm_encoder.upcycle import sparse_upcycle
from mllm_encoder.vision_tower import CLIPMoEVisionTower


def tower_args(select_layer=-2, select_feature="patch", **extra):
    return SimpleNamespace(mm_vision_select_layer=select_layer, mm_vision_select_feature=select_feature, **extra)


@pytest.fixture(scope="module")
def hf_siglip(tmp_path_factory):
    """A saved dense HF SiglipModel with SigLIP's image processor."""
    torch.manual_seed(0)
    model = SiglipModel(SiglipConfig(vision_config=tiny_siglip_vision_config(), text_config=tiny_siglip_text_config()))
    path = tmp_path_factory.mktemp("hf_siglip")
    model.eval().save_pretrained(path)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("select_feature", ["patch", "cls_patch"])
@pytest.mark.parametrize("select_layer", [-1, -2, 1])
def test_dense_siglip_tower_keeps_every_patch(hf_siglip, images, select_layer, select_feature):
    model, path = hf_siglip
    tower = CLIPMoEVisionTower(f"clip-moe:{path}", args=tower_args(select_layer, select_feature), source=str(path))
    with torch.no_grad():
        expected = model.vision_model(pixel_values=images, output_hidden_states=True).hidden_states[select_layer]
        actual = tower(images)
    assert actual.shape == (3, 16, 32), "SigLIP has no class token: all 16 patches, for 'patch' too"
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert isinstance(tower.image_processor, SiglipImageProcessor)
    assert tower.num_patches == 16 and not any("head" in name for name in tower.vision_tower.state_dict())


def test_siglip_moe_tower_rebuilds_from_the_saved_llava_config(hf_siglip, images, tmp_path):
    model, path = hf_siglip
    torch.manual_seed(1)
    moe = sparse_upcycle(path, num_experts=4, top_k=2)
    save_checkpoint(moe, tmp_path / "siglip-moe", SiglipImageProcessor(size={"height": 32, "width": 32}))
    tower = CLIPMoEVisionTower("clip-moe", args=tower_args(), source=str(tmp_path / "siglip-moe"))
    with torch.no_grad():
        expected = moe.vision_model(images, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(tower(images), expected, rtol=1e-5, atol=1e-5)
    saved = json.loads(json.dumps(tower.export_llava_config()))  # as stored in a LLaVA config.json
    assert saved["mm_vision_num_experts"] == 4
    assert saved["mm_vision_image_processor"]["image_processor_type"] == "SiglipImageProcessor"
    rebuilt = CLIPMoEVisionTower("clip-moe", args=tower_args(**saved), delay_load=True, source="/nonexistent")
    rebuilt.load_state_dict(tower.state_dict())
    assert isinstance(rebuilt.image_processor, SiglipImageProcessor)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images), tower(images), rtol=0, atol=0)


def test_naflex_tower_is_refused(hf_siglip):
    config = tiny_siglip_vision_config()
    config.pop("image_size")
    args = tower_args(mm_vision_config={"model_type": "siglip2_moe_vision_model", "num_patches": 16, **config})
    with pytest.raises(ValueError, match="NaFlex"):
        CLIPMoEVisionTower("clip-moe", args=args, delay_load=True, source=str(hf_siglip[1]))
