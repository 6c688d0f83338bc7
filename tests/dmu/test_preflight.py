"""Issue 20: ``clip-moe dmu run`` checks its config against the base, the data and the installed backends before
any stage; the run directory is recognised by its manifest; the run's config is recorded, never the user's file
rewritten, and a changed value is refused when a finished stage depends on it."""

import json
import os
import re
import stat

import pytest
import yaml
from dmu_helpers import tiny_run_values

from mllm_encoder.cli import main
from mllm_encoder.dmu.accelerator import build_accelerator
from mllm_encoder.dmu.config import config_from_dict
from mllm_encoder.dmu.pipeline import run_pipeline
from mllm_encoder.dmu.trainer import TrainingInterrupted


def _values(run_dir, base, data, **dmu):
    return tiny_run_values(run_dir, base, data, **{"num_experts": 2, **dmu})


def _run_cli(capsys, *argv):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in argv])
    return exit_info.value.code, capsys.readouterr().err


def _write(path, values, comment="# my experiment\n"):
    path.write_text(comment + yaml.safe_dump(values))
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"dmu": {"moe_layers": [0, 7]}},
            r"dmu\.moe_layers: layer index 7 is out of range for the base's vision_config \(.*num_hidden_layers=2",
        ),
        ({"dmu": {"image_clusters": 50}}, r"dmu\.image_clusters: 50 clusters for 40 training samples"),
        ({"mcl": {"batch_size": 100}}, r"mcl\.batch_size: one batch of 100 x 1 process\(es\) is more than the 40"),
        ({"dmu": {"text_context": 32}}, r"dmu\.text_context: 32 is not longer than the base's text context"),
    ],
)
def test_config_is_checked_against_the_base_and_the_data_before_any_stage(
    tmp_path, tiny_base_dir, shapes_data, capsys, change, message
):
    values = _values(tmp_path / "run", tiny_base_dir, shapes_data)
    for section, fields in change.items():
        values[section] = {**values[section], **fields}
    config = _write(tmp_path / "run.yaml", values)
    code, err = _run_cli(capsys, "dmu", "run", config)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert f"{config}: " in err and re.search(message, err), err
    assert not (tmp_path / "run").exists(), "refused before the run directory (or its run.log) was created"


def test_a_kmeans_backend_that_is_not_installed_is_refused_first(tmp_path, tiny_base_dir, shapes_data, monkeypatch):
    from mllm_encoder.dmu import preflight
    from mllm_encoder.dmu.pipeline import check_run_inputs

    monkeypatch.setitem(preflight.KMEANS_MODULES, "faiss", "no_such_module_for_the_test")
    assert "faiss" not in preflight.installed_kmeans_backends() and "sklearn" in preflight.installed_kmeans_backends()
    config = config_from_dict(_values(tmp_path / "run", tiny_base_dir, shapes_data, kmeans_backend="faiss"), "r.yaml")
    with pytest.raises(ValueError, match=r"r\.yaml: dmu\.kmeans_backend: 'faiss' is not installed \(installed: \["):
        run_pipeline(config, "dmu", build_accelerator("no"), where="r.yaml")
    assert not (tmp_path / "run").exists()
    training = check_run_inputs(config, ["finetune"], "r.yaml")  # a baseline clusters nothing
    assert len(training) == 40
    training.close()


def test_a_missing_base_creates_no_run_log(tmp_path, shapes_data, capsys):
    config = _write(tmp_path / "run.yaml", _values(tmp_path / "run", tmp_path / "missing-base", shapes_data))
    code, err = _run_cli(capsys, "dmu", "run", config)
    assert code == 1 and "missing-base: no such directory" in err
    assert not (tmp_path / "run").exists()


def test_a_user_directory_is_not_a_run_directory(tmp_path, tiny_base_dir, shapes_data, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "config.yaml").write_text("my: notes\n")
    (user / "results.json").write_text('{"mine": 1}\n')
    config = _write(tmp_path / "run.yaml", _values(tmp_path / "elsewhere", tiny_base_dir, shapes_data))
    code, err = _run_cli(capsys, "dmu", "run", config, "--run-dir", user, "--method", "finetune")
    assert code == 1 and f"{user}: exists and is not a DMU run directory; refusing to replace it" in err
    assert "--overwrite" in err
    assert sorted(os.listdir(user)) == ["config.yaml", "results.json"]
    assert (user / "results.json").read_text() == '{"mine": 1}\n'


def test_the_users_config_inside_the_run_directory_is_never_rewritten(tmp_path, tiny_base_dir, shapes_data, capsys):
    run = tmp_path / "run"
    run.mkdir()
    config = _write(run / "config.yaml", _values(run, tiny_base_dir, shapes_data))  # `run` holds only the config
    code, err = _run_cli(capsys, "dmu", "run", config, "--method", "finetune")
    assert code == 1 and "is not a DMU run directory" in err  # a non-empty directory without a manifest
    main(["dmu", "run", str(config), "--method", "finetune", "--overwrite"])
    assert config.read_text().startswith("# my experiment\n"), "the user's file (with its comments) is kept"
    recorded = json.loads((run / "manifest.json").read_text())["config"]
    assert recorded["mcl"]["steps"] == 4 and yaml.safe_load((run / "run_config.yaml").read_text()) == recorded

    edited = _values(run, tiny_base_dir, shapes_data)
    edited["mcl"] = {
        **edited["mcl"],
        "steps": 5,
    }  # finetune/train trained (num_experts - 1) x mcl.steps + route.steps steps
    _write(config, edited)
    code, err = _run_cli(capsys, "dmu", "run", config, "--method", "finetune")
    assert code == 1 and "differs in mcl.steps" in err and "stage finetune/train" in err
    assert json.loads((run / "manifest.json").read_text())["config"]["mcl"]["steps"] == 4, "nothing recorded"


def test_a_change_no_finished_stage_depends_on_is_applied(tmp_path, tiny_base_dir, shapes_data, caplog):
    accelerator = build_accelerator("no")
    first = _values(tmp_path, tiny_base_dir, shapes_data)
    with pytest.raises(TrainingInterrupted):  # base/eval, extract_0 and cluster_0 finish; mcl_1 stops at step 1
        run_pipeline(config_from_dict(first), "dmu", accelerator, stop_after_step=1)
    clusters = {**first, "dmu": {**first["dmu"], "image_clusters": 4}}
    with pytest.raises(ValueError, match=r"differs in dmu\.image_clusters\), and stage dmu/cluster_0"):
        run_pipeline(config_from_dict(clusters), "dmu", accelerator)
    fixed = {**first, "dmu": {**first["dmu"], "moe_layers": [1]}, "data": {**first["data"], "max_bad_fraction": 0.5}}
    stages = run_pipeline(config_from_dict(fixed), "dmu", accelerator)
    assert "dmu/eval" in stages and "applying the changed ['data.max_bad_fraction', 'dmu.moe_layers']" in caplog.text
    assert json.loads((tmp_path / "manifest.json").read_text())["config"]["dmu"]["moe_layers"] == [1]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_every_file_of_a_run_follows_the_umask_and_nothing_else_is_written(tmp_path, tiny_base_dir, shapes_data, umask):
    """Walks every file a small end-to-end run (CLI, finetune) writes: modes, and nothing outside the run."""
    config = _write(tmp_path / "run.yaml", _values(tmp_path / "run", tiny_base_dir, shapes_data))
    before = {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*")}
    previous = os.umask(umask)
    try:
        main(["dmu", "run", str(config), "--method", "finetune"])
    finally:
        os.umask(previous)
    written = [path for path in (tmp_path / "run").rglob("*")]
    assert {p.name for p in written} >= {"model.safetensors", "trainable.safetensors", "manifest.json", "run.log"}
    for path in written:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == expected, f"{path}: {oct(path.stat().st_mode)}"
    assert {path: path.stat().st_mtime_ns for path in before} == before, "an input was modified"
    assert set(tmp_path.iterdir()) == {tmp_path / "run.yaml", tmp_path / "run"}


def test_extract_with_every_image_missing_fails_even_with_max_bad_fraction_one(
    tmp_path, tiny_base_dir, shapes_data, capsys
):
    empty = tmp_path / "no-images"
    empty.mkdir()
    argv = ["dmu", "extract", "--model", tiny_base_dir, "--out", tmp_path / "features", "--data", shapes_data["train"]]
    code, err = _run_cli(capsys, *argv, "--image-root", empty, "--max-bad-fraction", "1.0")
    assert code == 1 and f"{shapes_data['train']}: none of the 40 samples could be read" in err


def test_stage_commands_never_write_over_their_inputs_or_the_users_files(tmp_path, tiny_base_dir, shapes_data, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "history.json").write_text("my history\n")
    (user / "notes.txt").write_text("mine\n")
    data = ["--data", shapes_data["train"]]
    code, err = _run_cli(capsys, "dmu", "extract", "--model", tiny_base_dir, "--out", user, *data)
    assert code == 1 and f"{user}: exists and is not an output of clip-moe dmu extract" in err and "--overwrite" in err
    code, err = _run_cli(capsys, "dmu", "mcl", "--model", tiny_base_dir, "--labels", "l.npy", "--out", user, *data)
    assert code == 1 and f"{user}: exists and is not an output of clip-moe dmu mcl" in err
    code, err = _run_cli(capsys, "dmu", "assemble", tiny_base_dir, tiny_base_dir, "--out", tiny_base_dir)
    assert code == 1 and "the output is the input" in err
    assert sorted(os.listdir(user)) == ["history.json", "notes.txt"]
