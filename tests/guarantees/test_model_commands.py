"""The model commands' guarantees (upcycle, convert, inspect, save_checkpoint, load_clip_moe; docs/guarantees.md):
outputs never destroy user files, broken checkpoints and configs are refused naming the file or field, errors are
one line, outputs honour the umask, stale staging is cleaned."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_text_config, tiny_vision_config

from mllm_encoder import CLIPMoEConfig, CLIPMoEModel, CLIPMoEVisionConfig, CLIPMoEVisionModel
from mllm_encoder.atomic import atomic_directory, atomic_write_text
from mllm_encoder.checkpoint import check_output_dir, save_checkpoint
from mllm_encoder.cli import main
from mllm_encoder.loading import load_clip_moe

REPO_ROOT = Path(__file__).resolve().parents[2]


def _run_cli(capsys, *argv):
    """``clip-moe ARGV`` in process: (exit code, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in argv])
    return exit_info.value.code, capsys.readouterr().err


def _user_dir(path):
    path.mkdir()
    (path / "notes.txt").write_text("the user's own file")
    return path


# Item 1: existing outputs are never silently destroyed.


def test_upcycle_refuses_a_user_directory_and_a_file(tiny_hf_clip_dir, tmp_path, capsys):
    user = _user_dir(tmp_path / "userdir")
    code, err = _run_cli(capsys, "upcycle", tiny_hf_clip_dir, user, "--num-experts", "2", "--overwrite")
    assert code == 1 and f"{user}: exists and is not a CLIP-MoE checkpoint directory" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert (user / "notes.txt").read_text() == "the user's own file" and sorted(os.listdir(user)) == ["notes.txt"]

    existing_file = tmp_path / "result"
    existing_file.write_text("keep me")
    code, err = _run_cli(capsys, "upcycle", tiny_hf_clip_dir, existing_file, "--num-experts", "2")
    assert code == 1 and "exists and is not a directory" in err
    assert existing_file.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result", "userdir"], "no staging left behind"


def test_an_output_that_is_an_input_is_refused_even_with_overwrite(tiny_hf_clip_dir, tmp_path, capsys):
    first = tmp_path / "a"
    shutil.copytree(tiny_hf_clip_dir, first)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    code, err = _run_cli(capsys, "assemble", first, first, "--out", first, "--overwrite")
    assert code == 1 and f"{first}: the output is the input" in err
    code, err = _run_cli(capsys, "upcycle", first, tmp_path, "--num-experts", "2", "--overwrite")
    assert code == 1 and "the output is the input" in err, "an output holding the input would delete it"
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before


def test_our_own_output_is_replaced_only_with_overwrite(tiny_hf_clip_dir, tmp_path, capsys):
    out = tmp_path / "moe"
    main(["upcycle", str(tiny_hf_clip_dir), str(out), "--num-experts", "2", "--top-k", "1"])
    code, err = _run_cli(capsys, "upcycle", tiny_hf_clip_dir, out, "--num-experts", "3", "--top-k", "1")
    assert code == 1 and "a checkpoint already exists there; pass --overwrite" in err
    assert load_clip_moe(out).config.vision_config.num_experts == 2
    main(["upcycle", str(tiny_hf_clip_dir), str(out), "--num-experts", "3", "--top-k", "1", "--overwrite"])
    assert load_clip_moe(out).config.vision_config.num_experts == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe"]
    empty = tmp_path / "empty"
    empty.mkdir()
    main(["upcycle", str(tiny_hf_clip_dir), str(empty), "--num-experts", "2", "--top-k", "1"])
    assert (empty / "model.safetensors").is_file(), "an empty directory is a fine output"


def test_convert_refuses_a_user_directory(tmp_path, capsys):
    weights = tmp_path / "timm.safetensors"
    save_file({"x": torch.zeros(1)}, str(weights))
    user = _user_dir(tmp_path / "out")
    code, err = _run_cli(capsys, "convert", weights, user, "--from", "timm")
    assert code == 1 and "is not a CLIP-MoE checkpoint directory" in err
    code, err = _run_cli(capsys, "convert", weights, tmp_path, "--from", "timm", "--overwrite")
    assert code == 1 and "the output is the input" in err
    assert (user / "notes.txt").exists()


def test_save_checkpoint_and_atomic_directory_refuse_by_default(tmp_path):
    torch.manual_seed(0)
    model = CLIPMoEVisionModel(CLIPMoEVisionConfig(**tiny_vision_config()))
    save_checkpoint(model, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="pass --overwrite"):
        save_checkpoint(model, tmp_path / "ckpt")
    save_checkpoint(model, tmp_path / "ckpt", overwrite=True)  # the DMU pipeline's resumable stages do this
    user = _user_dir(tmp_path / "user")
    with pytest.raises(ValueError, match="not a CLIP-MoE checkpoint"):
        save_checkpoint(model, user, overwrite=True)
    with pytest.raises(ValueError, match="not a CLIP-MoE checkpoint"):
        check_output_dir(tmp_path / "ckpt" / "..", overwrite=True)
    with pytest.raises(ValueError, match="already exists and is not empty"):
        with atomic_directory(user):
            pass
    assert (user / "notes.txt").exists()


# Item 3: broken checkpoints and configs are refused, naming the file and the field.


@pytest.fixture()
def saved_moe(tmp_path):
    torch.manual_seed(0)
    config = CLIPMoEConfig(
        vision_config=tiny_vision_config(num_experts=2, top_k=1),
        text_config=tiny_text_config(num_experts=2, top_k=1),
        projection_dim=16,
    )
    return save_checkpoint(CLIPMoEModel(config), tmp_path / "saved")


def test_missing_and_unexpected_tensors_are_named(saved_moe, tmp_path, capsys):
    weights = saved_moe / "model.safetensors"
    state = load_file(str(weights))
    dropped = sorted(k for k in state if k.startswith("vision_model.encoder.layers.1.mlp.experts."))
    assert len(dropped) == 4
    save_file({k: v for k, v in state.items() if k not in dropped}, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="4 missing tensor") as error:
        load_clip_moe(saved_moe)
    assert dropped[0] in str(error.value) and str(saved_moe) in str(error.value)

    code, err = _run_cli(capsys, "upcycle", saved_moe, tmp_path / "out", "--num-experts", "2")
    assert code == 1 and "4 missing tensor(s)" in err and not (tmp_path / "out").exists()

    save_file(dict(state, **{"extra.weight": torch.zeros(2)}), str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"1 unexpected tensor\(s\) \(e.g. \['extra.weight'\]\)"):
        load_clip_moe(saved_moe)
    save_file(dict(state, **{"visual_projection.weight": torch.zeros(8, 32)}), str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"1 tensor\(s\) of the wrong shape \(e.g. \['visual_projection.weight'\]\)"):
        load_clip_moe(saved_moe)


def test_documented_drops_still_load(saved_moe):
    vision = load_clip_moe(saved_moe, CLIPMoEVisionModel)  # the text tower and projections are dropped
    full = load_clip_moe(saved_moe)
    for name, tensor in vision.state_dict().items():
        torch.testing.assert_close(tensor, full.state_dict()[name], msg=name)


@pytest.mark.parametrize(
    "tower, field, value, message",
    [
        ("vision_config", "num_hidden_layers", -1, "vision_config.num_hidden_layers must be >= 1, got -1"),
        ("vision_config", "hidden_size", "32", "vision_config.hidden_size must be an integer, got '32'"),
        ("text_config", "top_k", 3, "text_config.top_k (num_experts=2) must be in [1, 2], got 3"),
        ("text_config", "num_experts", 0, "text_config.num_experts must be >= 1, got 0"),
        ("vision_config", "moe_layers", [0, 3], "vision_config.moe_layers: layer index 3 is out of range"),
        ("vision_config", "hidden_act", "swish2", "vision_config.hidden_act must be one of"),
        ("vision_config", "norm_topk_prob", "yes", "vision_config.norm_topk_prob must be true or false"),
        ("text_config", "vocab_size", 0.5, "text_config.vocab_size must be an integer"),
    ],
)
def test_bad_config_fields_are_named_with_the_file(saved_moe, tower, field, value, message):
    config_path = saved_moe / "config.json"
    config = json.loads(config_path.read_text())
    config[tower][field] = value
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError) as error:
        load_clip_moe(saved_moe)
    assert str(error.value).startswith(f"{config_path}: {message}"), str(error.value)


def test_corrupt_weights_and_missing_directory_name_the_path(saved_moe, tmp_path, capsys):
    weights = saved_moe / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, err = _run_cli(capsys, "inspect", saved_moe)
    assert code == 1 and err.startswith(f"clip-moe inspect: error: {weights}: corrupt or unreadable weights file")
    code, err = _run_cli(capsys, "inspect", tmp_path / "nope")
    assert code == 1 and f"{tmp_path / 'nope'}: no such directory" in err


# Error format: one line, non-zero exit, traceback only on request.


def test_error_format_and_debug_switches(tmp_path, capsys, monkeypatch):
    code, err = _run_cli(capsys, "inspect", tmp_path)
    assert (
        code == 1
        and err
        == f"clip-moe inspect: error: {tmp_path}: no config.json (expected a CLIP or CLIP-MoE checkpoint directory)\n"
    )
    with pytest.raises(ValueError, match="no config.json"):
        main(["--debug", "inspect", str(tmp_path)])
    monkeypatch.setenv("MLLM_ENCODER_DEBUG", "1")
    with pytest.raises(ValueError, match="no config.json"):
        main(["inspect", str(tmp_path)])


def test_console_script_prints_one_line_and_exits_non_zero(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLLM_ENCODER_DEBUG"}
    result = subprocess.run(
        [sys.executable, "-m", "mllm_encoder", "inspect", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
        env=env,
    )
    assert result.returncode == 1
    missing = tmp_path / "missing"
    expected = (
        f"clip-moe inspect: error: {missing}: no such directory (expected a CLIP or CLIP-MoE checkpoint directory)"
    )
    assert result.stderr.strip().splitlines()[-1] == expected
    assert "Traceback" not in result.stderr


# Hygiene: permissions follow the umask; staging of killed writers is removed on the next write.


def test_outputs_honour_the_umask(tmp_path):
    torch.manual_seed(0)
    model = CLIPMoEVisionModel(CLIPMoEVisionConfig(**tiny_vision_config()))
    previous = os.umask(0o022)
    try:
        save_checkpoint(model, tmp_path / "ckpt")
        atomic_write_text(tmp_path / "result.json", "{}\n")
    finally:
        os.umask(previous)
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "ckpt" / "config.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "result.json").stat().st_mode & 0o777 == 0o644


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_staging_of_dead_writers_is_removed(tmp_path):
    import socket

    host = socket.gethostname()
    dead, alive = _dead_pid(), os.getppid()
    stale = [f".model.tmp-{host}-{dead}-0123abcd", f".model.old-{host}-{dead}", f".model.old-{dead}"]
    kept = [f".model.tmp-{host}-{alive}-0123abcd", f".model.tmp-otherhost-{dead}-0123abcd", ".other.old-1"]
    for name in stale + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_text("partial")
    (tmp_path / f".result.json.tmp-{host}-{dead}-89abcdef").write_text("partial")
    with atomic_directory(tmp_path / "model") as staging:
        (staging / "x").write_text("new")
    atomic_write_text(tmp_path / "result.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["model", "result.json"])
