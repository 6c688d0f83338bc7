"""The control replication (``clip-moe demo --replication``): the audit's world and the control-only runner."""

import json

import numpy as np
import pytest

from mllm_encoder.cli import main
from mllm_encoder.data.marker_world import COLOURS, MARKER_PIXELS, render_marker_world, write_marker_world
from mllm_encoder.dmu.replication import METRICS, REPLICATION_QUICK


def test_marker_world_images_captions_and_determinism(tmp_path):
    sample = {"background": "red", "disc": "navy", "size": "large", "marker": "black"}
    image = np.asarray(render_marker_world(sample, np.random.default_rng(3), 48)).astype(int)
    rows, cols = np.nonzero(np.abs(image - 15).max(axis=-1) <= 30)  # black: far from all 10 named colours
    assert len(rows) == MARKER_PIXELS**2 and np.ptp(rows) == np.ptp(cols) == MARKER_PIXELS - 1  # one 8x8 square

    paths = write_marker_world(tmp_path / "a", num_train=20, num_eval=5, image_size=48, seed=1)
    write_marker_world(tmp_path / "b", num_train=20, num_eval=5, image_size=48, seed=1)
    for name in ("train.json", "eval_attributes.json", "images/train/000007.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    samples = json.loads(open(paths["train_attributes"]).read())["samples"]
    assert len(samples) == 20 and all(s["background"] != s["disc"] and s["disc"] in COLOURS for s in samples)
    first = samples[0]
    assert first["caption"] == f"a {first['size']} {first['disc']} disc on a {first['background']} background " + (
        f"with a {first['marker']} marker."
    )
    with pytest.raises(ValueError, match="num_eval"):
        write_marker_world(tmp_path / "c", num_train=2, num_eval=0)


@pytest.mark.filterwarnings("ignore")
def test_quick_replication_shape_equal_steps_and_resume(tmp_path, capsys):
    main(["demo", "--replication", "--quick", "--out", str(tmp_path)])
    assert "Replication, swap_size: one-cluster batches" in capsys.readouterr().out
    out = tmp_path / "replication"
    results = json.loads((out / "replication.json").read_text())
    assert list(results) == ["seeds", "control", "verdict", "settings"] and results["seeds"] == [0]
    assert results["settings"]["image_size"] == 48 and len(results["verdict"]) == len(METRICS)
    for arm in ("cluster", "random"):
        assert list(results["control"][arm]) == list(METRICS)
        for entry in results["control"][arm].values():
            assert set(entry) == {"mean", "std", "per_seed"} and 0.0 <= entry["mean"] <= 100.0
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    run = json.loads((out / "seed_0" / "run" / "manifest.json").read_text())["stages"]
    assert run["dmu/mcl_1"]["steps"] == stages["seed_0/random"]["steps"] == REPLICATION_QUICK.mcl_steps
    before = (out / "replication.json").read_bytes()
    main(["demo", "--replication", "--quick", "--out", str(tmp_path)])  # resumes: nothing retrains
    assert (out / "replication.json").read_bytes() == before
