"""Issue 19 (item 3) for the single-stage commands: ``clip-moe dmu extract|mcl|route`` index the training data
once per command under ``--index-dir`` (default ``OUT/data_index``), shared by the ranks and memory-mapped, and
a later command given that folder reuses the index instead of reading the data file or the tar headers again."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from dmu_helpers import write_tar_shards

from mllm_encoder.cli import main
from mllm_encoder.data import records as records_module
from mllm_encoder.data import webdataset as webdataset_module
from mllm_encoder.dmu.features import load_features


def _extract(base, data, out, *extra):
    main(
        ["dmu", "extract", "--model", str(base), "--data", str(data), "--out", str(out), "--batch-size", "16"]
        + [str(arg) for arg in extra]
    )


def _files(directory):
    return {path: path.stat().st_mtime_ns for path in directory.rglob("*") if path.is_file()}


def _never_rebuilt(monkeypatch):
    """Make reading the records file or a tar shard's headers (what an index is built from) fail."""

    def rebuild(*args, **kwargs):
        raise AssertionError("the index was built again")

    monkeypatch.setattr(records_module, "iter_image_text_records", rebuild)
    monkeypatch.setattr(webdataset_module, "index_shard", rebuild)


@pytest.mark.parametrize("source", ["json", "tar"])
def test_a_stage_command_indexes_into_its_output_and_another_reuses_the_index(
    tmp_path, tiny_base_dir, shapes_data, monkeypatch, source
):
    data = shapes_data["train"] if source == "json" else write_tar_shards(shapes_data, tmp_path / "shards")
    _extract(tiny_base_dir, data, tmp_path / "first")
    index_dir = tmp_path / "first" / "data_index"
    if source == "json":
        assert [path.name for path in index_dir.iterdir()] == ["records"]
        assert json.loads((index_dir / "records" / "meta.json").read_text())["num_records"] == 40
    else:
        assert [path.name for path in index_dir.iterdir()] == ["shards"]
        saved = sorted(path.name.split("-")[:2] for path in (index_dir / "shards").glob("*.npy"))
        assert saved == [["train", "0.tar"], ["train", "1.tar"]]
    saved = _files(index_dir)

    _never_rebuilt(monkeypatch)
    _extract(tiny_base_dir, data, tmp_path / "second", "--index-dir", index_dir)
    assert _files(index_dir) == saved, "the saved index was rewritten"
    assert sorted(path.name for path in (tmp_path / "second").iterdir()) == ["features_rank0.part00000.safetensors"]
    first, second = load_features(tmp_path / "first"), load_features(tmp_path / "second")
    assert first["index"].tolist() == list(range(40))
    for key in ("index", "image", "text"):
        np.testing.assert_array_equal(first[key], second[key])


def test_training_stages_and_reruns_use_the_saved_index(tmp_path, tiny_base_dir, shapes_data, monkeypatch, capsys):
    _extract(tiny_base_dir, shapes_data["train"], tmp_path / "features")
    index_dir = tmp_path / "features" / "data_index"
    saved = _files(index_dir)
    labels = tmp_path / "labels.npy"
    np.save(labels, np.arange(40) % 2)

    _never_rebuilt(monkeypatch)
    _extract(tiny_base_dir, shapes_data["train"], tmp_path / "features")  # a rerun into its own --out
    train = ["--data", shapes_data["train"], "--index-dir", index_dir, "--steps", "1", "--batch-size", "4"]
    main(
        ["dmu", "mcl", "--model", str(tiny_base_dir), "--labels", str(labels), "--out", str(tmp_path / "mcl")]
        + [str(arg) for arg in train]
    )
    assert "1 steps" in capsys.readouterr().out
    assert _files(index_dir) == saved
    assert not (tmp_path / "mcl" / "data_index").exists()


def _refusal(capsys, *argv):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in argv])
    return exit_info.value.code, capsys.readouterr().err


def test_the_index_folder_follows_the_output_rule(tmp_path, tiny_base_dir, shapes_data, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine\n")
    out = tmp_path / "out"
    extract = ["dmu", "extract", "--model", tiny_base_dir, "--data", shapes_data["train"], "--out", out]
    code, err = _refusal(capsys, *extract, "--index-dir", mine, "--overwrite")
    assert code == 1 and f"{mine}: exists and is not a data index of clip-moe dmu" in err
    assert "choose a new or empty output" in err
    code, err = _refusal(capsys, *extract, "--index-dir", out)
    assert code == 1 and f"{out}: the index folder is --out or holds it" in err
    code, err = _refusal(capsys, *extract, "--index-dir", shapes_data["image_root"])  # holds the data file
    assert code == 1 and "the output is the input" in err
    mcl = ["dmu", "mcl", "--model", tiny_base_dir, "--labels", "l.npy", "--out", out, "--data", shapes_data["train"]]
    code, err = _refusal(capsys, *mcl, "--index-dir", mine)
    assert code == 1 and f"{mine}: exists and is not a data index" in err
    assert sorted(path.name for path in mine.iterdir()) == ["notes.txt"] and not out.exists()


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("source", ["json", "tar"])
def test_two_ranks_build_one_index_and_a_second_command_reuses_it(tmp_path, tiny_base_dir, shapes_data, source):
    """Under torchrun the ranks build the index together (tar: one shard each; JSON: the main process) and embed
    the same features as one process; a second command given the folder leaves the index untouched."""
    data = shapes_data["train"] if source == "json" else write_tar_shards(shapes_data, tmp_path / "shards")
    _extract(tiny_base_dir, data, tmp_path / "single")
    env = {key: value for key, value in os.environ.items() if key not in ("WORLD_SIZE", "RANK", "MASTER_ADDR")}
    env["OMP_NUM_THREADS"] = "1"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29631"]
    extract = ["-m", "mllm_encoder", "dmu", "extract", "--model", tiny_base_dir, "--data", data, "--batch-size", "8"]

    def launch(out, *extra):
        command = [str(arg) for arg in (*torchrun, *extract, "--out", out, *extra)]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]

    launch(tmp_path / "two")
    assert sorted(path.name[:14] for path in (tmp_path / "two").glob("features_*")) == [
        "features_rank0",
        "features_rank1",
    ]
    index_dir = tmp_path / "two" / "data_index"
    saved = _files(index_dir)
    assert len(saved) == (7 if source == "json" else 4)  # records: 3 columns x (strings, offsets) + meta.json
    launch(tmp_path / "again", "--index-dir", index_dir)
    assert _files(index_dir) == saved and not (tmp_path / "again" / "data_index").exists()
    single = load_features(tmp_path / "single")
    for out in ("two", "again"):
        features = load_features(tmp_path / out)
        assert features["index"].tolist() == single["index"].tolist()
        for key in ("image", "text"):
            np.testing.assert_allclose(features[key], single[key], rtol=0, atol=1e-3)
