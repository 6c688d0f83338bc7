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
    assert (config.mcl.adam_betas, config.mcl.adam_eps, config.mcl.grad_clip, config.mcl.drop_last) == (
        (0.9, 0.999),
        1e-8,
        None,
        True,
    )
    assert (config.dmu.text_context, config.route.warmup_steps) == (248, 200)
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


@pytest.mark.parametrize(
    "override,message",
    [
        ({"dmu": {"num_experts": 2, "top_k": 3}}, r"dmu\.top_k \(3\) must be <= dmu\.num_experts \(2\)"),
        ({"dmu": {"num_experts": 1}}, r"dmu\.num_experts: must be >= 2"),
        ({"mcl": {"steps": "abc"}}, r"mcl\.steps: expected int, got 'abc'"),
        ({"mcl": {"lr": "fast"}}, r"mcl\.lr: expected float, got 'fast'"),
        ({"mcl": {"batch_size": 0}}, r"mcl\.batch_size: must be > 0"),
        ({"mcl": {"drop_last": "yes"}}, r"mcl\.drop_last: expected true or false"),
        ({"route": {"trainable": "ffn"}}, r"route\.trainable must be 'router' or 'ffn\+router'"),
        ({"mcl": {"trainable": "everything"}}, r"mcl\.trainable: must be one of"),
        ({"mcl": {"steps": 5, "warmup_steps": 10}}, r"mcl\.warmup_steps \(10\) > mcl\.steps \(5\)"),
        ({"runtime": {"mixed_precision": "fp8"}}, r"runtime\.mixed_precision: must be one of"),
        ({"seed": 1.5}, r"seed: expected int"),
        ({"dmu": {"moe_layers": [0, -1]}}, r"dmu\.moe_layers: must be non-negative"),
        ({"dmu": {"kmeans_restarts": 0}}, r"dmu\.kmeans_restarts: must be >= 1"),
        ({"dmu": {"kmeans_tolerance": 1}}, r"dmu\.kmeans_tolerance: must be in \[0, 1\)"),
    ],
)
def test_every_field_is_checked_with_its_name(override, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict({"base_model": "m", "data": {"train": "t.json"}, **override})


def test_yaml_exponents_without_a_dot_are_numbers():
    config = config_from_dict({"base_model": "m", "data": {"train": "t.json"}, "mcl": {"lr": "1e-5"}})
    assert config.mcl.lr == 1e-5
