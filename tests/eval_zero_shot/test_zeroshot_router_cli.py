"""Expert load from router logits (hand-computed and on a tiny CLIP-MoE), its plot, and the eval CLI."""

import json

import pytest
import torch
from PIL import Image

from mllm_encoder.cli import main
from mllm_encoder.eval.classification import zero_shot_classify
from mllm_encoder.eval.retrieval import evaluate_retrieval
from mllm_encoder.eval.router_analysis import expert_load, format_load_table, plot_expert_load, routing_counts


def test_routing_counts_hand_computed():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0], [1.0, 3.0, 2.0, 0.0]])
    assert routing_counts(logits, 2).tolist() == [1, 2, 2, 1]  # top-2: {0,1}, {3,2}, {1,2}
    assert routing_counts(logits, 2, torch.tensor([1, 0, 1])).tolist() == [1, 2, 1, 0]
    assert routing_counts(logits, 1).tolist() == [1, 1, 0, 1]


def test_expert_load_on_tiny_clip_moe(tiny_moe, tmp_path):
    model, _, tokenizer = tiny_moe
    torch.manual_seed(0)
    tokens = tokenizer(
        ["a red circle", "two small blue striped squares on the left"],
        padding="max_length",
        max_length=16,
        return_tensors="pt",
    )
    batches = [
        {"pixel_values": torch.randn(2, 3, 32, 32), **tokens},
        None,
        {"pixel_values": torch.randn(3, 3, 32, 32)},
    ]
    load = expert_load(model, batches, progress=False)
    assert set(load) == {"vision", "text"}
    vision, text = load["vision"], load["text"]
    assert vision["layers"] == [0, 1, 2] and text["layers"] == [0, 1]
    assert vision["num_tokens"] == 5 * 17 and text["num_tokens"] == int(tokens["attention_mask"].sum())
    assert (vision["num_experts"], vision["top_k"]) == (4, 2)
    for entry in (vision, text):
        assert torch.tensor(entry["load"]).sum(1) == pytest.approx(torch.ones(len(entry["layers"])))
    with torch.no_grad():
        logits = model.vision_model(torch.cat([b["pixel_values"] for b in batches if b])).router_logits
    expected = routing_counts(logits[1], 2) / (5 * 17 * 2)
    assert vision["load"][1] == pytest.approx(expected.tolist())
    table = format_load_table(load)
    assert table.count("\n") == 1 + 3 + 2 and "| vision | 1 |" in table
    png = plot_expert_load(load, tmp_path / "load.png", title="tiny")
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 100


def test_expert_load_rejects_dense_model(tiny_hf_clip_dir):
    from transformers import CLIPModel

    with pytest.raises(ValueError, match="no MoE layers"):
        expert_load(CLIPModel.from_pretrained(tiny_hf_clip_dir), [], progress=False)


def test_cli_retrieval_and_classify(tiny_moe, tiny_clip_moe_dir, karpathy_set, class_folder, tmp_path, capsys):
    root, _ = karpathy_set
    out = tmp_path / "out" / "retrieval.json"
    main(
        [
            "eval",
            "retrieval",
            "--model",
            str(tiny_clip_moe_dir),
            "--data",
            str(root / "dataset_coco.json"),
            "--output",
            str(out),
            "--device",
            "cpu",
        ]
    )
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["num_images"] == 3 and result["num_captions"] == 6 and "i2t_r10" in result
    assert "| i2t R@1 |" in printed and f"{result['t2i_r1']:.2f}" in printed
    model, image_processor, tokenizer = tiny_moe  # the command's numbers are the library's on the same checkpoint
    expected = evaluate_retrieval(model, root / "dataset_coco.json", image_processor, tokenizer, progress=False)
    assert {key: result[key] for key in expected} == pytest.approx(expected)
    (tmp_path / "classes.txt").write_text("blue\ngreen\n# comment\nred\n")
    (tmp_path / "templates.txt").write_text("a photo of a {}.\na {} thing.\n")
    out = tmp_path / "classify.json"
    main(
        [
            "eval",
            "classify",
            "--model",
            str(tiny_clip_moe_dir),
            "--image-folder",
            str(class_folder),
            "--classes",
            str(tmp_path / "classes.txt"),
            "--templates",
            str(tmp_path / "templates.txt"),
            "--output",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    assert list(result["per_class"]) == ["blue", "green", "red"] and result["num_images"] == 6
    assert "| red |" in capsys.readouterr().out
    templates = ["a photo of a {}.", "a {} thing."]
    expected = zero_shot_classify(
        model, tokenizer, class_folder, ["blue", "green", "red"], templates, image_processor, progress=False
    )
    assert {key: result[key] for key in expected} == expected
