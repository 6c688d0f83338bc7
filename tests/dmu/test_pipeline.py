"""``clip-moe dmu run``: stages, manifest, resume after an injected stop, equal-step baselines."""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import yaml
from dmu_helpers import tiny_run_values, write_tar_shards
from safetensors.numpy import load_file

from mllm_encoder.cli import main
from mllm_encoder.dmu.accelerator import build_accelerator
from mllm_encoder.dmu.config import DataSection, DMUSection, config_from_dict, load_config
from mllm_encoder.dmu.features import load_features
from mllm_encoder.dmu.pipeline import run_pipeline
from mllm_encoder.dmu.stages import run_cluster, run_extract
from mllm_encoder.dmu.trainer import TrainingInterrupted
from mllm_encoder.locking import LockError, directory_lock


def _config(run_dir, base, data, **dmu):
    return config_from_dict(tiny_run_values(run_dir, base, data, **dmu))


def _weights(run_dir, stage):
    return load_file(str(run_dir / stage / "model" / "model.safetensors"))


def test_dmu_run_resumes_to_the_same_checkpoint(tmp_path, tiny_base_dir, shapes_data):
    accelerator = build_accelerator("no")
    straight = tmp_path / "straight"
    stages = run_pipeline(_config(straight, tiny_base_dir, shapes_data, num_experts=2), "dmu", accelerator)
    assert list(stages) == [
        "base/eval",
        "dmu/extract_0",
        "dmu/cluster_0",
        "dmu/mcl_1",
        "dmu/assemble",
        "dmu/route",
        "dmu/eval",
    ]
    labels = np.load(straight / "dmu" / "cluster_0" / "labels.npy")
    assert labels.shape == (40,) and labels.min() >= 0 and labels.max() < 9
    sizes = json.loads((straight / "dmu" / "cluster_0" / "cluster_sizes.json").read_text())
    assert sum(sizes.values()) == 40 and stages["dmu/cluster_0"]["num_clusters"] == len(sizes) > 1
    assert (straight / "dmu" / "cluster_0" / "cluster_sizes.png").stat().st_size > 0
    assert any((straight / "dmu" / "mcl_1" / "tensorboard").iterdir())

    resumed = tmp_path / "resumed"
    config_file = tmp_path / "resumed.yaml"
    config_file.write_text(yaml.safe_dump(tiny_run_values(resumed, tiny_base_dir, shapes_data, num_experts=2)))
    with pytest.raises(TrainingInterrupted):  # a kill in dmu/mcl_1 after step 3; the last save was at step 2
        run_pipeline(load_config(config_file), "dmu", accelerator, stop_after_step=3)
    manifest = json.loads((resumed / "manifest.json").read_text())["stages"]
    assert "dmu/cluster_0" in manifest and "dmu/mcl_1" not in manifest
    assert (resumed / "dmu" / "mcl_1" / "train_state" / "step_00000002").is_dir()
    main(["dmu", "run", str(config_file)])
    for stage in ("dmu/mcl_1", "dmu/assemble", "dmu/route"):
        a, b = _weights(straight, stage), _weights(resumed, stage)
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-6, err_msg=f"{stage}: {name}")


def test_rerun_skips_finished_stages_and_rejects_a_changed_config(tmp_path, tiny_base_dir, shapes_data):
    accelerator = build_accelerator("no")
    config = _config(tmp_path, tiny_base_dir, shapes_data, num_experts=2)
    run_pipeline(config, "finetune", accelerator)
    history = json.loads((tmp_path / "finetune" / "train" / "history.json").read_text())
    assert len(history) == 4 + 3  # (num_experts - 1) x MCL steps + router steps
    assert not (tmp_path / "results.json").exists()  # no eval.data: nothing measured, no empty results (issue 23)
    before = (tmp_path / "finetune" / "train" / "model" / "model.safetensors").stat().st_mtime_ns
    run_pipeline(config, "finetune", accelerator)
    assert (tmp_path / "finetune" / "train" / "model" / "model.safetensors").stat().st_mtime_ns == before
    with pytest.raises(ValueError, match=r"different config \(differs in dmu\.num_experts\)"):
        run_pipeline(_config(tmp_path, tiny_base_dir, shapes_data, num_experts=3), "finetune", accelerator)


def _copy_with_corrupt_images(shapes_data, tmp_path, corrupt: int):
    root = tmp_path / "data"
    shutil.copytree(shapes_data["image_root"], root)
    records = json.loads((root / "train.json").read_text())
    for record in records[:corrupt]:
        (root / record["image"]).write_bytes(b"not an image")
    return str(root / "train.json"), [i for i in range(corrupt)]


def test_bad_images_get_no_pseudo_label_and_too_many_stop_the_stage(tmp_path, tiny_base_dir, shapes_data):
    accelerator = build_accelerator("no")
    train, bad = _copy_with_corrupt_images(shapes_data, tmp_path, corrupt=1)
    data = DataSection(train=train, max_bad_fraction=0.05)
    run_extract(tiny_base_dir, data, tmp_path / "features", accelerator, batch_size=16)
    clustering = DMUSection(kmeans_backend="sklearn")
    labels = np.load(run_cluster(tmp_path / "features", 40, tmp_path / "clusters", clustering=clustering))
    assert (labels[bad] == -1).all() and (np.delete(labels, bad) >= 0).all()

    train, _ = _copy_with_corrupt_images(shapes_data, tmp_path / "many", corrupt=10)
    with pytest.raises(ValueError, match="were bad"):
        run_extract(tiny_base_dir, DataSection(train=train, max_bad_fraction=0.05), tmp_path / "f2", accelerator)


def test_inputs_are_checked_before_anything_is_written(tmp_path, tiny_base_dir, shapes_data):
    accelerator = build_accelerator("no")
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match="missing-base"):
        run_pipeline(_config(run_dir, tmp_path / "missing-base", shapes_data), "dmu", accelerator)
    missing_data = {**shapes_data, "train": str(tmp_path / "missing.json")}
    with pytest.raises(ValueError, match="missing.json"):
        run_pipeline(_config(run_dir, tiny_base_dir, missing_data), "dmu", accelerator)
    assert not run_dir.exists()


def test_the_command_writes_no_run_log_for_a_missing_base(tmp_path, shapes_data, capsys):
    """docs/dmu.md: nothing is written before the inputs are checked, run.log included (issue 23)."""
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(tiny_run_values(tmp_path / "run", tmp_path / "missing-base", shapes_data)))
    with pytest.raises(SystemExit):
        main(["dmu", "run", str(config_file)])
    assert "missing-base" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_run_without_a_finished_stage_accepts_a_corrected_config(tmp_path, tiny_base_dir, shapes_data):
    accelerator = build_accelerator("no")
    first = _config(tmp_path, tiny_base_dir, shapes_data, num_experts=3)
    with pytest.raises(TrainingInterrupted):  # base/eval finished, finetune/train stopped before its first save
        run_pipeline(first, "finetune", accelerator, stop_after_step=1)
    corrected = _config(tmp_path, tiny_base_dir, shapes_data, num_experts=2)
    stages = run_pipeline(corrected, "finetune", accelerator)
    assert "finetune/train" in stages
    assert yaml.safe_load((tmp_path / "run_config.yaml").read_text())["dmu"]["num_experts"] == 2
    assert json.loads((tmp_path / "manifest.json").read_text())["config"]["dmu"]["num_experts"] == 2


def test_text_context_stretches_the_base_for_every_method(tmp_path, tiny_base_dir, shapes_data):
    accelerator = build_accelerator("no")
    config = _config(tmp_path, tiny_base_dir, shapes_data, num_experts=2, text_context=48)
    stages = run_pipeline(config, "finetune", accelerator)
    assert list(stages)[:2] == ["base/stretch", "base/eval"]
    stretched = tmp_path / "base" / "stretch" / "model"
    assert json.loads((stretched / "config.json").read_text())["text_config"]["max_position_embeddings"] == 48
    trained = json.loads((tmp_path / "finetune" / "train" / "model" / "config.json").read_text())
    assert trained["text_config"]["max_position_embeddings"] == 48
    summary = json.loads((tmp_path / "finetune" / "train" / "summary.json").read_text())
    assert (summary["steps"], summary["samples_seen"], summary["clusters_used"]) == (4 + 3, 7 * 4, 1)


def test_dmu_extract_from_tar_shards_equals_extract_from_json(tmp_path, tiny_base_dir, shapes_data):
    accelerator = build_accelerator("no")
    pattern = write_tar_shards(shapes_data, tmp_path / "shards")
    main(["dmu", "extract", "--model", str(tiny_base_dir), "--data", pattern, "--out", str(tmp_path / "f_tar")])
    run_extract(tiny_base_dir, DataSection(train=shapes_data["train"]), tmp_path / "f_json", accelerator, 16)
    from_tar, from_json = load_features(tmp_path / "f_tar"), load_features(tmp_path / "f_json")
    assert from_tar["index"].tolist() == list(range(40))
    for key in ("image", "text"):
        np.testing.assert_allclose(from_tar[key], from_json[key], rtol=0, atol=1e-5)


def test_dmu_run_trains_fromwrite_tar_shards(tmp_path, tiny_base_dir, shapes_data):
    accelerator = build_accelerator("no")
    pattern = write_tar_shards(shapes_data, tmp_path / "shards")
    run_dir = tmp_path / "run"
    stages = run_pipeline(_config(run_dir, tiny_base_dir, {"train": pattern}, num_experts=2), "dmu", accelerator)
    assert "dmu/eval" in stages
    labels = np.load(run_dir / "dmu" / "cluster_0" / "labels.npy")
    assert labels.shape == (40,) and (labels >= 0).all()
    assert not (run_dir / ".lock").exists()


def test_a_second_run_on_one_directory_is_refused_and_a_stale_lock_taken_over(tmp_path, tiny_base_dir, shapes_data):
    accelerator = build_accelerator("no")
    config = _config(tmp_path, tiny_base_dir, shapes_data, num_experts=2)
    with directory_lock(tmp_path):  # another run holds the directory
        with pytest.raises(LockError, match=rf"run directory {tmp_path} is in use by pid {os.getpid()}"):
            run_pipeline(config, "finetune", accelerator)
    assert not (tmp_path / "run_config.yaml").exists() and not (tmp_path / "manifest.json").exists()
    killed = subprocess.Popen([sys.executable, "-c", "pass"])
    killed.wait()
    record = {"pid": killed.pid, "host": socket.gethostname(), "started": None, "command": "clip-moe", "token": "x"}
    (tmp_path / ".lock").write_text(json.dumps(record))  # left by a run killed with -9
    assert "finetune/train" in run_pipeline(config, "finetune", accelerator)
    assert not (tmp_path / ".lock").exists()


def test_dmu_on_a_siglip_base_trains_with_the_sigmoid_loss_and_resumes(tmp_path, dmu_tokenizer_dir, shapes_data):
    from tiny_models import write_tiny_siglip_base

    from mllm_encoder import SiglipMoEModel
    from mllm_encoder.loading import load_clip_moe

    base = write_tiny_siglip_base(tmp_path / "siglip-base", dmu_tokenizer_dir)
    accelerator = build_accelerator("no")
    straight = run_pipeline(_config(tmp_path / "straight", base, shapes_data, num_experts=2), "dmu", accelerator)
    history = json.loads((tmp_path / "straight" / "dmu" / "mcl_1" / "history.json").read_text())
    assert history[0]["contrastive"] > 0 and "dmu/eval" in straight
    model = load_clip_moe(str(tmp_path / "straight" / "dmu" / "route" / "model"))
    assert isinstance(model, SiglipMoEModel) and model.config.vision_config.num_experts == 2
    resumed_config = _config(tmp_path / "resumed", base, shapes_data, num_experts=2)
    with pytest.raises(TrainingInterrupted):
        run_pipeline(resumed_config, "dmu", accelerator, stop_after_step=3)
    run_pipeline(resumed_config, "dmu", accelerator)
    for stage in ("dmu/mcl_1", "dmu/route"):
        a, b = _weights(tmp_path / "straight", stage), _weights(tmp_path / "resumed", stage)
        for name in a:
            np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-6, err_msg=f"{stage}: {name}")


def test_control_method_trains_stage_one_both_ways_and_shares_it_with_dmu(tmp_path, tiny_base_dir, shapes_data, capsys):
    values = tiny_run_values(tmp_path / "run", tiny_base_dir, shapes_data, num_experts=2)
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(values))
    with pytest.raises(SystemExit):
        main(["dmu", "run", str(config_file), "--method", "control"])
    assert "--method control compares two models on held-out data; set eval.data" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was written
    with pytest.raises(SystemExit):  # configs/demo.yaml's suggested command, without eval.data (issue 23)
        main(["dmu", "run", str(config_file), "--method", "all"])
    assert "--method all compares DMU, the baselines and the control on held-out data" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    values["eval"] = {"data": shapes_data["eval"], "batch_size": 8}
    config_file.write_text(yaml.safe_dump(values))
    main(["dmu", "run", str(config_file), "--method", "control"])
    run = tmp_path / "run"
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    assert list(stages) == [
        "base/eval",
        "dmu/extract_0",
        "dmu/cluster_0",
        "dmu/mcl_1",
        "expert_1/eval",
        "control/train",
        "control/eval",
    ]
    assert stages["control/train"]["steps"] == stages["dmu/mcl_1"]["steps"] == 4  # equal steps, same recipe
    one_cluster = json.loads((run / "dmu" / "mcl_1" / "summary.json").read_text())
    random = json.loads((run / "control" / "train" / "summary.json").read_text())
    assert random["clusters_used"] == 1 and one_cluster["clusters_used"] > 1  # random batches: one pool
    results = json.loads((run / "results.json").read_text())
    assert {"base", "expert_1", "control"} <= set(results) and "i2t_r1" in results["control"]
    mcl, control = _weights(run / "dmu", "mcl_1"), _weights(run / "control", "train")
    assert any(not np.array_equal(mcl[name], control[name]) for name in mcl)  # the batches differ, so do the arms
    main(["dmu", "run", str(config_file), "--method", "dmu"])  # DMU reuses the control's MCL stage 1
    after = json.loads((run / "manifest.json").read_text())["stages"]
    assert after["dmu/mcl_1"] == stages["dmu/mcl_1"] and "dmu/route" in after
    assert all(np.array_equal(mcl[name], value) for name, value in _weights(run / "dmu", "mcl_1").items())


@pytest.mark.slow
def test_two_runs_in_one_process_share_no_dataset_counters_or_log_handlers(
    tmp_path, tiny_base_dir, shapes_data, monkeypatch
):
    from mllm_encoder.dmu.resources import TrainingData

    train, bad = _copy_with_corrupt_images(shapes_data, tmp_path, corrupt=4)
    handed_out = []  # (run, dataset, bad samples counted when the stage got it)
    for_stage = TrainingData.for_stage

    def spy(self):
        dataset, collator = for_stage(self)
        handed_out.append((dataset, dataset.num_bad, collator))
        return dataset, collator

    monkeypatch.setattr(TrainingData, "for_stage", spy)
    runs, handlers = [], []
    for name in ("first", "second"):
        values = tiny_run_values(tmp_path / name, tiny_base_dir, {"train": train}, num_experts=2)
        values["data"]["max_bad_fraction"] = 0.5
        values["eval"] = {"data": shapes_data["eval"]}
        config_file = tmp_path / f"{name}.yaml"
        config_file.write_text(yaml.safe_dump(values))
        main(["dmu", "run", str(config_file), "--method", "control"])
        runs.append(handed_out[:])
        handed_out.clear()
        handlers.append(list(logging.getLogger().handlers))
        run_logs = [h for h in handlers[-1] if getattr(h, "baseFilename", "").endswith("run.log")]
        assert not run_logs  # the run removed the run.log handler it added
    assert handlers[0] == handlers[1]  # (the entry point's logging.basicConfig handler, added once, stays)
    first, second = runs
    assert len(first) == len(second) == 3  # extract_0, mcl_1 and the control's training: one dataset per run
    assert len({id(dataset) for dataset, _, _ in first}) == len({id(dataset) for dataset, _, _ in second}) == 1
    assert first[0][0] is not second[0][0]
    assert first[0][2].num_bad == len(bad)  # the extraction reads every sample: all the corrupt ones, once
    assert [counted for _, counted, _ in second] == [0, 0, 0]  # each stage starts its own count
    assert second[0][2].num_bad == len(bad)
    last = second[-1][0]  # after the control's training: only that stage's bad samples are listed
    assert len(last.bad_samples) == last.num_bad == second[-1][2].num_bad < 2 * len(bad)
    first_log, second_log = (tmp_path / name / "run.log" for name in ("first", "second"))
    for log, stages in ((first_log, first), (second_log, second)):  # each bad sample warned once, in its run's log
        assert log.read_text().count("skipping sample") == sum(collator.num_bad for _, _, collator in stages) >= 4


def test_a_run_dir_started_before_a_config_key_existed_resumes(tmp_path, tiny_base_dir, shapes_data):
    """A run started before ``dmu.kmeans_sample_size`` existed (its legacy config.yaml lacks the key) resumes with
    the default; a changed value is still refused once a stage that depends on it has finished."""
    from mllm_encoder.dmu.pipeline import _record_config
    from mllm_encoder.dmu.run_state import Manifest

    values = tiny_run_values(tmp_path, tiny_base_dir, shapes_data)
    saved = {**values, "dmu": {key: value for key, value in values["dmu"].items() if key != "kmeans_sample_size"}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    manifest = Manifest(tmp_path / "manifest.json")
    manifest.mark_done("dmu/cluster_0", labels="labels.npy")
    _record_config(config_from_dict(values), manifest, "run.yaml", None)
    assert manifest.config["dmu"]["kmeans_sample_size"] == config_from_dict(values).dmu.kmeans_sample_size
    changed = config_from_dict({**values, "dmu": {**values["dmu"], "kmeans_sample_size": 10}})
    with pytest.raises(ValueError, match="dmu.kmeans_sample_size"):
        _record_config(changed, manifest, "run.yaml", None)


def test_keys_added_since_a_run_started_take_the_resuming_configs_values(tmp_path, tiny_base_dir, shapes_data, caplog):
    """A run whose clusters were made before ``dmu.kmeans_restarts`` / ``kmeans_tolerance`` existed resumes with
    any value of them (here the old behaviour, 1 and 0), with a warning naming them; the manifest records them."""
    from mllm_encoder.dmu.pipeline import _record_config
    from mllm_encoder.dmu.run_state import Manifest

    values = tiny_run_values(tmp_path, tiny_base_dir, shapes_data)
    new_keys = ("kmeans_restarts", "kmeans_tolerance")
    old = {**values, "dmu": {key: value for key, value in values["dmu"].items() if key not in new_keys}}
    manifest = Manifest(tmp_path / "manifest.json")
    manifest.mark_done("dmu/cluster_0", labels="labels.npy")
    manifest.record_config(config_from_dict(old).to_dict())
    for key in new_keys:
        del manifest.config["dmu"][key]
    resumed = config_from_dict({**values, "dmu": {**values["dmu"], "kmeans_restarts": 1, "kmeans_tolerance": 0.0}})
    with caplog.at_level("WARNING", logger="mllm_encoder.dmu.pipeline"):
        _record_config(resumed, manifest, "run.yaml", None)
    assert "before dmu.kmeans_restarts, dmu.kmeans_tolerance existed" in caplog.text
    assert (manifest.config["dmu"]["kmeans_restarts"], manifest.config["dmu"]["kmeans_tolerance"]) == (1, 0.0)
    with pytest.raises(ValueError, match="dmu.kmeans_restarts"):  # recorded now: a change is refused again
        _record_config(config_from_dict(values), manifest, "run.yaml", None)
