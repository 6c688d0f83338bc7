"""Retrieval Recall@K against hand-computed values, and end to end on a tiny CLIP-MoE."""

import csv

import pytest
import torch
from PIL import Image

from mllm_encoder.data import ClipImageTransform, load_image_text_dataset
from mllm_encoder.data.retrieval_sets import read_retrieval_set
from mllm_encoder.eval.retrieval import evaluate_retrieval, format_retrieval_table, retrieval_metrics

# scores[image, caption] = TEXT_ROWS[caption][image] because the image embeddings are the identity
TEXT_ROWS = [[0.9, 0.1, 0.0], [0.2, 0.8, 0.1], [0.5, 0.4, 0.3], [0.0, 0.3, 0.7], [0.6, 0.45, 0.2]]
CAPTION_IMAGE = [0, 0, 1, 2, 2]


def test_metrics_match_hand_computed_ranks():
    metrics = retrieval_metrics(torch.eye(3), torch.tensor(TEXT_ROWS), CAPTION_IMAGE, ks=(1, 2, 3))
    # I2T ranks: image 0 -> 0 (caption 0 best), image 1 -> 2 (captions 1 and 4 higher), image 2 -> 0
    assert metrics["i2t_r1"] == pytest.approx(200 / 3) and metrics["i2t_r2"] == pytest.approx(200 / 3)
    assert metrics["i2t_r3"] == 100.0
    # T2I ranks: 0, 1, 1, 0, 2
    assert (metrics["t2i_r1"], metrics["t2i_r2"], metrics["t2i_r3"]) == pytest.approx((40.0, 80.0, 100.0))
    assert metrics["rsum"] == pytest.approx(2 * 200 / 3 + 100 + 40 + 80 + 100)
    assert (metrics["num_images"], metrics["num_captions"]) == (3, 5)


def test_ties_count_for_the_correct_item_and_bad_map_is_rejected():
    metrics = retrieval_metrics(torch.ones(2, 1), torch.ones(2, 1), [0, 1], ks=(1,))
    assert metrics["i2t_r1"] == metrics["t2i_r1"] == 100.0
    with pytest.raises(ValueError, match="caption_image"):
        retrieval_metrics(torch.eye(2), torch.eye(2), [0, 2])


def _tensor(output):
    return output if isinstance(output, torch.Tensor) else output.pooler_output  # transformers 5 HF CLIP


def _expected(model, processor, tokenizer, images, captions, caption_image):
    transform = ClipImageTransform.from_processor(processor)
    with torch.no_grad():
        pixels = torch.stack([transform(Image.open(path)) for path in images])
        image_embeds = torch.nn.functional.normalize(_tensor(model.get_image_features(pixel_values=pixels)), dim=-1)
        tokens = tokenizer(captions, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
        text_embeds = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    return retrieval_metrics(image_embeds, torch.nn.functional.normalize(_tensor(text_embeds), dim=-1), caption_image)


def test_karpathy_split_end_to_end(tiny_moe, karpathy_set):
    model, processor, tokenizer = tiny_moe
    root, captions = karpathy_set
    data = read_retrieval_set(root / "dataset_coco.json")
    assert [p.split("/")[-1] for p in data.images] == ["a.jpg", "b.jpg", "c.jpg"]
    assert data.caption_image == [0, 0, 1, 1, 1, 2]
    metrics = evaluate_retrieval(model, root / "dataset_coco.json", processor, tokenizer, batch_size=2, progress=False)
    expected = _expected(model, processor, tokenizer, data.images, data.captions, data.caption_image)
    assert metrics == pytest.approx(expected)
    assert not model.training
    assert "| i2t R@1 |" in format_retrieval_table({"tiny": metrics})


def test_csv_and_dataset_inputs_group_captions_per_image(tiny_moe, karpathy_set):
    model, processor, tokenizer = tiny_moe
    root, captions = karpathy_set
    with open(root / "pairs.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        writer.writerows([f"val2014/{name}", c] for name in ("a.jpg", "b.jpg", "c.jpg") for c in captions[name])
    reference = evaluate_retrieval(model, root / "dataset_coco.json", processor, tokenizer, progress=False)
    from_csv = evaluate_retrieval(model, root / "pairs.csv", processor, tokenizer, progress=False)
    assert from_csv == pytest.approx(reference)
    dataset = load_image_text_dataset(root / "pairs.csv", image_processor=processor, tokenizer=tokenizer)
    assert evaluate_retrieval(model, dataset, progress=False) == pytest.approx(reference)
    karpathy = load_image_text_dataset(
        root / "dataset_coco.json", format="karpathy", image_processor=processor, tokenizer=tokenizer
    )
    assert [r.caption for r in karpathy.records] == [r.caption for r in dataset.records]
    assert karpathy.records[4].source.endswith("dataset_coco.json: b.jpg sentence 2")
    assert evaluate_retrieval(model, karpathy, progress=False) == pytest.approx(reference)


def test_loader_of_pairs(tiny_moe, karpathy_set):
    model, processor, tokenizer = tiny_moe
    root, captions = karpathy_set
    transform = ClipImageTransform.from_processor(processor)
    names = ["a.jpg", "b.jpg", "c.jpg"]
    pixels = torch.stack([transform(Image.open(root / "val2014" / n)) for n in names])
    tokens = tokenizer([captions[n][0] for n in names], padding="max_length", max_length=16, return_tensors="pt")
    batches = [
        {
            "pixel_values": pixels[:2],
            "input_ids": tokens["input_ids"][:2],
            "attention_mask": tokens["attention_mask"][:2],
        },
        None,
        {
            "pixel_values": pixels[2:],
            "input_ids": tokens["input_ids"][2:],
            "attention_mask": tokens["attention_mask"][2:],
        },
    ]
    metrics = evaluate_retrieval(model, batches, progress=False)
    expected = _expected(
        model,
        processor,
        tokenizer,
        [root / "val2014" / n for n in names],
        [captions[n][0] for n in names],
        [0, 1, 2],
    )
    assert metrics == pytest.approx(expected)


def test_hf_clip_directory(tiny_hf_clip_dir, karpathy_set):
    from mllm_encoder.cli.eval_zero_shot import load_model_and_processors

    model, processor, tokenizer = load_model_and_processors(str(tiny_hf_clip_dir), "cpu")
    root, _ = karpathy_set
    metrics = evaluate_retrieval(model, root / "dataset_coco.json", processor, tokenizer, progress=False)
    data = read_retrieval_set(root / "dataset_coco.json")
    assert metrics == pytest.approx(
        _expected(model, processor, tokenizer, data.images, data.captions, data.caption_image)
    )


def test_malformed_karpathy_and_missing_image(tiny_moe, tmp_path):
    model, processor, tokenizer = tiny_moe
    (tmp_path / "bad.json").write_text('{"images": [{"filename": "x.jpg", "split": "test", "sentences": []}]}')
    with pytest.raises(ValueError, match=r"bad.json: images\[0\]"):
        read_retrieval_set(tmp_path / "bad.json")
    (tmp_path / "pairs.json").write_text('[{"image": "missing.jpg", "caption": "nothing"}]')
    with pytest.raises(ValueError, match="missing.jpg"):
        evaluate_retrieval(model, tmp_path / "pairs.json", processor, tokenizer, progress=False)
