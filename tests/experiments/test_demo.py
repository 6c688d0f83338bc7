"""``clip-moe demo --quick`` end to end: results.json's shape, the report, resuming, a loadable CLIP-MoE."""

import json

import pytest
import torch
from transformers import AutoModel

from mllm_encoder.cli import main
from mllm_encoder.experiments import report as report_module
from mllm_encoder.experiments.demo import QUICK
from mllm_encoder.experiments.report import METRICS, plot_losses


@pytest.mark.filterwarnings("ignore")
def test_quick_demo_end_to_end_and_resume(tmp_path, capsys, monkeypatch):
    drawn = []
    spy = lambda series, png: drawn.append(series) or plot_losses(series, png)  # noqa: E731
    monkeypatch.setattr(report_module, "plot_losses", spy)
    main(["demo", "--quick", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "| dmu |" in printed and "Control, swap_size:" in printed and "report:" in printed
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results)[:5] == ["seeds", "methods", "experts", "control", "verdict"] and results["seeds"] == [0]
    assert list(results["methods"]) == ["base", "finetune", "upcycle", "dmu"]
    assert list(results["experts"]) == [f"expert_{i}" for i in range(QUICK.num_experts)]
    assert results["control"]["cluster"] == results["experts"]["expert_1"]
    assert results["experts"]["expert_0"] == results["methods"]["base"]
    for group in ("methods", "experts", "control"):
        for stats in results[group].values():
            assert set(stats) == set(METRICS)
            for entry in stats.values():
                assert set(entry) == {"mean", "std", "per_seed"} and len(entry["per_seed"]) == 1
                assert 0.0 <= entry["mean"] <= 100.0 and entry["std"] == 0.0
    assert any("one seed, no significance claimed" in line for line in results["verdict"])
    assert set(results["router_load"]["seed_0"]) == {"finetune_eval", "pretrain_eval"}

    report = (tmp_path / "report.md").read_text()
    assert "## Verdict (computed from the numbers)" in report and results["verdict"][0] in report
    for png in ("attributes_methods", "attributes_experts", "loss_curves", "router_load_finetune_eval"):
        assert f"plots/{png}.png" in report
        assert (tmp_path / "plots" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"

    stages = json.loads((tmp_path / "seed_0" / "run" / "manifest.json").read_text())["stages"]
    dmu_steps = (QUICK.num_experts - 1) * QUICK.mcl_steps + QUICK.route_steps
    assert stages["dmu/route"]["steps"] == QUICK.route_steps and stages["finetune/train"]["steps"] == dmu_steps
    assert stages["upcycle/train"]["steps"] == dmu_steps  # equal optimizer steps
    assert stages["control/train"]["steps"] == stages["dmu/mcl_1"]["steps"] == QUICK.mcl_steps
    demo_steps = json.loads((tmp_path / "demo_manifest.json").read_text())["stages"]

    # the loss plot draws every trained arm of seed 0, each over all of its steps (paths from the run manifest)
    (series,) = drawn
    expected = {f"MCL stage {s}": QUICK.mcl_steps for s in range(1, QUICK.num_experts)}
    expected.update(
        {
            "router tuning": QUICK.route_steps,
            "control (random batches)": QUICK.mcl_steps,
            "direct fine-tuning": dmu_steps,
            "sparse upcycling": dmu_steps,
        }
    )
    assert {label: steps for label, (steps, _) in series.items()} == {
        label: list(range(1, count + 1)) for label, count in expected.items()
    }
    assert all(len(losses) == len(steps) and all(v > 0 for v in losses) for steps, losses in series.values())
    assert stages["control/train"]["history"] == str(tmp_path / "seed_0" / "run" / "control" / "train" / "history.json")

    before = (tmp_path / "results.json").read_bytes()
    main(["demo", "--quick", "--out", str(tmp_path)])  # everything is in the manifest: nothing reruns
    assert (tmp_path / "results.json").read_bytes() == before
    assert json.loads((tmp_path / "demo_manifest.json").read_text())["stages"] == demo_steps

    model = AutoModel.from_pretrained(tmp_path / "clip-moe")
    assert model.config.vision_config.num_experts == QUICK.num_experts and model.config.vision_config.top_k == 2
    with torch.no_grad():
        out = model(input_ids=torch.full((1, 8), 49407), pixel_values=torch.zeros(1, 3, 32, 32))
    assert out.logits_per_image.shape == (1, 1)


def test_configs_demo_yaml_is_the_demo_config_of_seed_0():
    from pathlib import Path

    from mllm_encoder.dmu.config import config_from_dict, load_config
    from mllm_encoder.experiments.demo import DEFAULT, run_config

    data = {"finetune_train": "runs/demo/data/finetune_train.json"}
    values = run_config(Path("runs/demo/seed_0/run"), Path("runs/demo/base/train/model"), data, DEFAULT, 0)
    assert config_from_dict(values).to_dict() == load_config("configs/demo.yaml").to_dict()


def test_demo_refuses_a_clip_moe_folder_it_did_not_write(tmp_path):
    from mllm_encoder.experiments.demo import run_demo

    mine = tmp_path / "clip-moe" / "notes.txt"
    mine.parent.mkdir()
    mine.write_text("keep me")
    with pytest.raises(ValueError, match="clip-moe: exists and was not written by this demo"):
        run_demo(tmp_path, quick=True)
    assert mine.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["clip-moe"]
