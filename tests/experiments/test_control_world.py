"""The control worlds (``clip-moe demo --control-world``): the marker generator and the control-only runner."""

import json

import numpy as np
import pytest

from mllm_encoder.cli import main
from mllm_encoder.experiments import control_world
from mllm_encoder.experiments.control_world import METRICS, WORLDS, size_purity
from mllm_encoder.experiments.marker_world import (
    COLOURS,
    MARKER_PIXELS,
    render_marker_world,
    write_marker_split,
    write_marker_world,
)


def test_marker_world_images_captions_and_determinism(tmp_path):
    sample = {"background": "red", "disc": "navy", "size": "large", "marker": "black"}
    image = np.asarray(render_marker_world(sample, np.random.default_rng(3), 48)).astype(int)
    rows, cols = np.nonzero(np.abs(image - 15).max(axis=-1) <= 30)  # black: far from all 10 named colours
    assert len(rows) == MARKER_PIXELS**2 and np.ptp(rows) == np.ptp(cols) == MARKER_PIXELS - 1  # one 8x8 square

    paths = write_marker_world(tmp_path / "a", num_train=20, num_eval=5, image_size=48, seed=1)
    write_marker_world(tmp_path / "b", num_train=20, num_eval=5, image_size=48, seed=1)
    write_marker_split(tmp_path / "b", "pretrain", 6, image_size=48, seed=1, size_mention=0.0)
    for name in ("train.json", "eval.json", "images/train/000007.png"):  # the pretraining split changes nothing
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert "pretrain" not in paths and not (tmp_path / "a" / "pretrain.json").exists()
    samples = json.loads(open(paths["train_attributes"]).read())["samples"]
    assert len(samples) == 20 and all(s["background"] != s["disc"] and s["disc"] in COLOURS for s in samples)
    first = samples[0]
    assert first["caption"] == f"a {first['size']} {first['disc']} disc on a {first['background']} background " + (
        f"with a {first['marker']} marker."
    )
    pretrain = json.loads((tmp_path / "b" / "pretrain_attributes.json").read_text())
    assert len(pretrain["samples"]) == 6 and pretrain["size_mention"] == 0.0
    for s in pretrain["samples"]:  # the size is drawn (and rendered) but never named
        assert s["size"] in ("large", "medium") and "large" not in s["caption"] and "medium" not in s["caption"]
        assert s["caption"] == f"a {s['disc']} disc on a {s['background']} background with a {s['marker']} marker."
    with pytest.raises(ValueError, match="num_eval"):
        write_marker_world(tmp_path / "c", num_train=2, num_eval=0)
    with pytest.raises(ValueError, match="count of 'pretrain' must be positive"):
        write_marker_split(tmp_path / "c", "pretrain", 0)


def test_size_mentions_change_captions_only(tmp_path):
    never = write_marker_split(tmp_path, "pretrain", 200, 48, seed=2, size_mention=0.0, name="never")
    seldom = write_marker_split(tmp_path, "pretrain", 200, 48, seed=2, size_mention=0.25, name="seldom")
    never, seldom = (
        json.loads(open(paths[f"{n}_attributes"]).read())["samples"]
        for n, paths in (("never", never), ("seldom", seldom))
    )
    named = [("large" in s["caption"] or "medium" in s["caption"]) for s in seldom]
    assert 0.15 <= sum(named) / len(named) <= 0.35 and not any("large" in s["caption"] for s in never)
    for a, b, mention in zip(never, seldom, named):  # same images and attributes; the size named or not
        assert {k: v for k, v in a.items() if k not in ("caption", "image")} == {
            k: v for k, v in b.items() if k not in ("caption", "image")
        }
        assert (tmp_path / a["image"]).read_bytes() == (tmp_path / b["image"]).read_bytes()
        assert b["caption"] == (f"a {b['size']} " + a["caption"][2:] if mention else a["caption"])
    with pytest.raises(ValueError, match="size_mention"):
        write_marker_split(tmp_path, "pretrain", 2, size_mention=1.5)
    with pytest.raises(ValueError, match="split"):
        write_marker_split(tmp_path, "test", 2)


def test_size_purity_counts_only_clusters_that_give_a_batch():
    sizes = ["large"] * 6 + ["medium"] * 2 + ["large", "medium", "medium"]
    labels = np.array([0] * 8 + [1] * 2 + [-1])  # cluster 1 (2 samples) gives no batch of 4; -1 is unlabelled
    assert size_purity(labels, sizes, batch_size=4) == pytest.approx(6 / 8)
    assert size_purity(labels, sizes, batch_size=2) == pytest.approx((6 + 1) / 10)


@pytest.mark.filterwarnings("ignore")
def test_quick_suppressed_world_shape_gates_equal_steps_and_resume(tmp_path, capsys):
    main(["demo", "--control-world", "suppressed", "--quick", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "Suppressed-size control, swap_size: one-cluster batches" in printed and "Outcome (pre-registered" in printed
    out = tmp_path / "control_suppressed"
    results = json.loads((out / "control.json").read_text())
    assert list(results) == ["seeds", "gates", "base_trained_on", "base", "control", "verdict", "settings"]
    assert results["seeds"] == [0] and results["base_trained_on"] == "pretrain_mention_0.json"
    assert results["settings"]["image_size"] == 48 and len(results["verdict"]) == len(METRICS) + 2
    gates = results["gates"]
    assert gates["size_suppressed"] == (gates["base_swap_size"] <= 65.0) and len(gates["size_purity"]) == 1
    assert 0.5 <= gates["size_purity"][0] <= 1.0
    for arm in ("cluster", "random"):
        assert list(results["control"][arm]) == list(METRICS)
        for entry in results["control"][arm].values():
            assert set(entry) == {"mean", "std", "per_seed"} and 0.0 <= entry["mean"] <= 100.0
    pretrain = json.loads((out / "data" / "pretrain_mention_0.json").read_text())
    captions = [r["conversations"][1]["value"] for r in pretrain]
    assert captions and not any("large" in text or "medium" in text for text in captions)
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    run = json.loads((out / "seed_0" / "run" / "manifest.json").read_text())["stages"]
    assert run["dmu/mcl_1"]["steps"] == run["control/train"]["steps"] == WORLDS["suppressed"].quick.mcl_steps
    assert "seed_0/control" in stages and "dmu/assemble" not in run  # the control alone, no MoE
    before = (out / "control.json").read_bytes()
    main(["demo", "--control-world", "suppressed", "--quick", "--out", str(tmp_path)])  # resumes: nothing retrains
    assert (out / "control.json").read_bytes() == before


def test_audit_world_is_the_replication_and_unknown_worlds_are_refused(tmp_path):
    audit, suppressed = WORLDS["audit"], WORLDS["suppressed"]
    assert audit.size_mentions == () and suppressed.size_mentions == (0.0,) and audit.label == "Replication"
    assert audit.settings.seeds == (0, 1, 2) and suppressed.settings.seeds == (0, 1, 2, 3, 4)
    assert {k: v for k, v in vars(audit.settings).items() if k != "seeds"} == {
        k: v for k, v in vars(suppressed.settings).items() if k != "seeds"
    }
    with pytest.raises(SystemExit):
        main(["demo", "--control-world", "nowhere", "--out", str(tmp_path)])


@pytest.mark.filterwarnings("ignore")
def test_quick_seldom_world_calibrates_on_the_base_alone(tmp_path, monkeypatch):
    results = control_world.run_control_world(tmp_path / "none", "seldom", quick=True)  # a tiny base: G3 fails
    assert [entry["size_mention"] for entry in results["calibration"]] == [0.1, 0.25, 0.5]
    assert not any(entry["passed"] for entry in results["calibration"]) and "control" not in results
    assert results["verdict"][-1].endswith("No size mention passed: the arms were not run.")
    assert not (tmp_path / "none" / "control_seldom" / "seed_0").exists()

    monkeypatch.setattr(control_world, "MIN_BASE_PROBE_SIZE", 0.0)  # G1 on a barely trained base passes
    monkeypatch.setattr(control_world, "MAX_BASE_SWAP_SIZE", 100.0)
    results = control_world.run_control_world(tmp_path / "first", "seldom", quick=True)
    assert [entry["passed"] for entry in results["calibration"]] == [True]
    assert results["base_trained_on"] == "pretrain_mention_0.1.json"
    assert results["verdict"][0].startswith("Calibration (G1") and results["verdict"][-1].startswith("Outcome")
    assert results["base"] == results["calibration"][0]["base"]
