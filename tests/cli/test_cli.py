"""The ``clip-moe`` model commands end to end on tiny checkpoints."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from mllm_encoder.cli import main
from mllm_encoder.loading import load_clip_moe


def test_upcycle_then_inspect(tiny_hf_clip_dir, tmp_path, capsys):
    out = tmp_path / "moe"
    main(
        [
            "upcycle",
            str(tiny_hf_clip_dir),
            str(out),
            "--num-experts",
            "4",
            "--top-k",
            "2",
            "--vision-moe-layers",
            "1,2",
            "--text-moe-layers",
            "",
        ]
    )
    assert (out / "tokenizer_config.json").exists() and (out / "preprocessor_config.json").exists()
    model = load_clip_moe(out)
    assert model.config.vision_config.moe_layer_indices == [1, 2]
    assert model.config.text_config.moe_layer_indices == []

    capsys.readouterr()
    main(["inspect", str(out), "--json"])
    report = json.loads(capsys.readouterr().out)
    vision = report["towers"]["vision"]
    assert vision["experts_per_layer"] == [1, 4, 4]
    expert = 2 * 32 * 64 + 64 + 32  # fc1 + fc2 weights and biases of one expert
    assert vision["parameters"] - vision["active_parameters"] == 2 * 2 * expert  # 2 layers x (4-2) idle experts
    assert report["parameters"] == sum(p.numel() for p in model.parameters())

    main(["inspect", str(out)])
    text = capsys.readouterr().out
    assert "vision experts per layer: 1 4 4" in text and "none (dense)" in text


def test_assemble_two_checkpoints(tiny_hf_clip_dir, tmp_path):
    second = tmp_path / "stage1"
    shutil.copytree(tiny_hf_clip_dir, second)
    main(["assemble", str(tiny_hf_clip_dir), str(second), "--out", str(tmp_path / "moe"), "--top-k", "1"])
    model = load_clip_moe(tmp_path / "moe")
    assert model.config.vision_config.num_experts == 2 and model.config.vision_config.top_k == 1
    experts = model.vision_model.encoder.layers[0].mlp.experts.fc1.weight
    torch.testing.assert_close(experts[0], experts[1])


def test_dmu_assemble_is_the_same_command_with_the_same_refusals(tiny_hf_clip_dir, tmp_path, capsys):
    second = tmp_path / "stage1"
    shutil.copytree(tiny_hf_clip_dir, second)
    for command in (["assemble"], ["dmu", "assemble"]):
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        options = sorted(word for word in capsys.readouterr().out.split() if word.startswith("--"))
        assert "--overwrite" in options and "--atol" in options
        if command == ["assemble"]:
            expected = options
        assert options == expected
    out = tmp_path / "moe"
    main(["dmu", "assemble", str(tiny_hf_clip_dir), str(second), "--out", str(out), "--top-k", "1"])
    assert load_clip_moe(out).config.vision_config.num_experts == 2
    written = (out / "config.json").stat().st_mtime_ns
    for command in (["assemble"], ["dmu", "assemble"]):  # an existing checkpoint is replaced only when asked
        with pytest.raises(SystemExit) as exit_info:
            main([*command, str(tiny_hf_clip_dir), str(second), "--out", str(out)])
        assert exit_info.value.code == 1 and "pass --overwrite to replace it" in capsys.readouterr().err
    assert (out / "config.json").stat().st_mtime_ns == written


def test_bad_layer_list_is_a_clear_error(tiny_hf_clip_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["upcycle", str(tiny_hf_clip_dir), str(tmp_path / "x"), "--moe-layers", "a,b"])
    assert "comma-separated layer indices" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["upcycle", str(tiny_hf_clip_dir), str(tmp_path / "x"), "--moe-layers", "7"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.endswith(
        f"clip-moe upcycle: error: --moe-layers 7 applies to every tower, and the vision tower of {tiny_hf_clip_dir} "
        "has 3 layers (0-2); choose each tower's layers with --vision-moe-layers and --text-moe-layers ('' = dense)\n"
    )
    assert not (tmp_path / "x").exists()


def test_shared_moe_layers_beyond_the_text_tower_name_the_per_tower_flags(tiny_hf_clip_dir, tmp_path, capsys):
    """README's case (issue 23): layers of the deeper image tower passed with --moe-layers."""
    with pytest.raises(SystemExit):
        main(["upcycle", str(tiny_hf_clip_dir), str(tmp_path / "x"), "--moe-layers", "1,2"])
    error = capsys.readouterr().err
    assert f"the text tower of {tiny_hf_clip_dir} has 2 layers (0-1)" in error and "--vision-moe-layers" in error
    main(["upcycle", str(tiny_hf_clip_dir), str(tmp_path / "x"), "--moe-layers", "1,2", "--text-moe-layers", "1"])
    model = load_clip_moe(tmp_path / "x")
    assert model.config.vision_config.moe_layer_indices == [1, 2]
    assert model.config.text_config.moe_layer_indices == [1]


@pytest.mark.parametrize("command", ["upcycle", "assemble", "convert", "inspect"])
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: clip-moe {command}" in capsys.readouterr().out


def test_console_script_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "mllm_encoder", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "upcycle" in result.stdout and "inspect" in result.stdout


def test_eval_answer_finds_the_llava_answerer_through_its_entry_point():
    from mllm_encoder.cli.eval_mllm import answerer_class

    answerer = answerer_class()  # imports llava_patch.integrations.answerer (not llava itself) only now
    assert (answerer.__module__, answerer.__name__) == ("llava_patch.integrations.answerer", "LlavaAnswerer")
    with pytest.raises(ImportError, match="no answerer 'other' is registered under the mllm_encoder.answerers"):
        answerer_class("other")
