"""``clip-moe demo --quick`` end to end: results, report, loadable CLIP-MoE checkpoint."""

import json

import pytest
import torch
from transformers import AutoModel

from mllm_encoder.cli import main


@pytest.mark.filterwarnings("ignore")
def test_quick_demo_end_to_end(tmp_path, capsys):
    main(["demo", "--quick", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "| dmu |" in printed and "report:" in printed
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results) == ["base", "finetune", "upcycle", "dmu"]
    for metrics in results.values():
        assert {"i2t_r1", "t2i_r1", "acc_texture", "acc_colour", "acc_mean"} <= set(metrics)
        assert all(0.0 <= value <= 100.0 for value in metrics.values())
    report = (tmp_path / "report.md").read_text()
    assert "| method |" in report and "plots/loss_curves.png" in report and "expert_load_dmu.png" in report
    for png in ("loss_curves", "attribute_accuracy", "expert_load_dmu"):
        assert (tmp_path / "plots" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"

    model = AutoModel.from_pretrained(tmp_path / "clip-moe")
    assert model.config.vision_config.num_experts == 4 and model.config.vision_config.top_k == 2
    route = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]
    assert route["dmu/route"]["steps"] == 2 and route["finetune/train"]["steps"] == 3 * 2 + 2  # equal steps
    with torch.no_grad():
        out = model(input_ids=torch.full((1, 8), 49407), pixel_values=torch.zeros(1, 3, 32, 32))
    assert out.logits_per_image.shape == (1, 1)
