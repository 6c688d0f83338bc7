"""The Family records and the tables derived from them (mllm_encoder.families)."""

import pytest
from tiny_models import tiny_clip_moe_config, tiny_siglip_moe_config
from transformers import CLIPConfig, CLIPModel

from mllm_encoder import CLIPMoEModel, CLIPMoEVisionModel, Siglip2MoEModel, SiglipMoEModel, SiglipMoEVisionModel
from mllm_encoder.checkpoint import CLIP_MOE_MODEL_TYPES, image_processor_class
from mllm_encoder.families import FAMILIES, MODEL_CLASS_BY_TYPE, family_of, family_of_model, loss_kind_of
from mllm_encoder.vision_tower import tower_family


def test_each_family_is_named_by_its_classes():
    assert {name: (family.loss, family.image_processor) for name, family in FAMILIES.items()} == {
        "clip": ("softmax", "CLIPImageProcessor"),
        "siglip": ("sigmoid", "SiglipImageProcessor"),
        "siglip2": ("sigmoid", "Siglip2ImageProcessor"),
    }
    assert CLIP_MOE_MODEL_TYPES == (
        "clip_moe", "clip_moe_vision_model", "clip_moe_text_model",
        "siglip_moe", "siglip_moe_vision_model", "siglip_moe_text_model",
        "siglip2_moe", "siglip2_moe_vision_model", "siglip2_moe_text_model",
    )  # fmt: skip
    assert MODEL_CLASS_BY_TYPE["siglip_vision_model"] is SiglipMoEVisionModel
    assert MODEL_CLASS_BY_TYPE["clip"] is MODEL_CLASS_BY_TYPE["clip_moe"] is CLIPMoEModel
    assert MODEL_CLASS_BY_TYPE["siglip2"] is Siglip2MoEModel and len(MODEL_CLASS_BY_TYPE) == 18
    for family in FAMILIES.values():
        for tower in (family.vision_model, family.text_model):
            # a tower config reads a two-tower directory of its own family only
            assert tower.config_class.two_tower_model_types == family.model.config_class.read_model_types()
            assert family_of_model(tower) is family_of(tower.config_class.model_type) is family


def test_loss_kind_is_the_family_s_and_named_not_guessed():
    assert loss_kind_of(SiglipMoEModel(tiny_siglip_moe_config())) == "sigmoid"
    assert loss_kind_of(CLIPMoEModel(tiny_clip_moe_config())) == "softmax"
    assert loss_kind_of(CLIPModel(CLIPConfig())) == "softmax"  # HF's dense models: by model_type
    with pytest.raises(ValueError, match="CLIPMoEVisionModel .* is not a two-tower model of a CLIP-MoE family"):
        loss_kind_of(CLIPMoEVisionModel(tiny_clip_moe_config().vision_config))


def test_llava_tower_behaviour_and_image_processors_come_from_the_records():
    assert tower_family({}, "x") is FAMILIES["clip"]  # no model_type: CLIP
    assert tower_family({"model_type": "siglip_vision_model"}, "x").llava.feature_strategy == "full"
    assert FAMILIES["clip"].llava.feature_strategy == "default" and FAMILIES["clip"].llava.anyres
    with pytest.raises(ValueError, match="x: a siglip2 tower .* cannot serve as a LLaVA tower .*FixRes"):
        tower_family({"model_type": "siglip2_vision_model"}, "x")
    assert image_processor_class("SiglipImageProcessorFast", "x").__name__ == "SiglipImageProcessor"
    assert image_processor_class("LlavaNextImageProcessor", "x").__name__ == "CLIPImageProcessor"
    with pytest.raises(ValueError, match="is not a model of a CLIP-MoE family"):
        family_of_model(object)
