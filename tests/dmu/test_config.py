"""The YAML run config: the shipped configs load, bad keys are named."""

from pathlib import Path

import pytest

from mllm_encoder.dmu.config import config_from_dict, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_paper_recipe_config():
    config = load_config(CONFIGS / "paper_vitl14_336_sharegpt4v.yaml")
    assert (config.dmu.num_experts, config.dmu.top_k, config.dmu.image_clusters, config.dmu.text_clusters) == (
        4,
        2,
        3,
        3,
    )
    assert (config.mcl.lr, config.mcl.weight_decay, config.mcl.warmup_steps, config.mcl.batch_size) == (
        1e-5,
        0.2,
        200,
        100,
    )
    assert (config.mcl.temperature, config.mcl.label_smoothing, config.mcl.trainable) == (0.01, 0.1, "ffn")
    assert (config.route.lr, config.route.weight_decay, config.route.aux_loss_coef, config.route.trainable) == (
        1e-6,
        0.01,
        0.01,
        "router",
    )


def test_demo_config_loads():
    config = load_config(CONFIGS / "demo.yaml")
    assert config.dmu.num_experts == 4 and config.route.trainable == "router"


def test_bad_keys_are_named(tmp_path):
    base = {"base_model": "m", "data": {"train": "t.json"}}
    with pytest.raises(ValueError, match="mcl.*unknown keys \\['learning_rate'\\]"):
        config_from_dict({**base, "mcl": {"learning_rate": 1}})
    with pytest.raises(ValueError, match="unknown top-level key 'stages'"):
        config_from_dict({**base, "stages": 3})
    with pytest.raises(ValueError, match="required"):
        config_from_dict({"data": {"train": "t.json"}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("mcl: [unclosed")
    with pytest.raises(ValueError, match="bad.yaml"):
        load_config(bad)
    assert config_from_dict(base).route.lr == 1e-6  # section defaults are the paper's
