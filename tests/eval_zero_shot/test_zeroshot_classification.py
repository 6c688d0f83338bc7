"""Zero-shot classification against hand-computed values and a manual computation on a tiny CLIP-MoE."""

import pytest
import torch
from PIL import Image

from mllm_encoder.data import ClipImageTransform
from mllm_encoder.data.synthetic import (
    ATTRIBUTE_PROMPTS,
    SHAPES,
    TEXTURES,
    load_attributes,
    sample_caption,
    set_object_attribute,
    write_shapes_dataset,
)
from mllm_encoder.eval import classification
from mllm_encoder.eval.caption_swap import swapped_captions
from mllm_encoder.eval.classification import (
    classification_metrics,
    per_attribute_accuracy,
    zero_shot_classify,
)


def test_metrics_hand_computed():
    class_embeds = torch.eye(3)
    # predictions (argmax): 0, 2, 1, 1 ; labels 0, 1, 1, 2 -> top-1 hits: yes, no, yes, no
    image_embeds = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.3, 0.6], [0.2, 0.7, 0.1], [0.1, 0.5, 0.4]])
    labels = torch.tensor([0, 1, 1, 2])
    metrics = classification_metrics(image_embeds, class_embeds, labels, ["a", "b", "c"])
    assert metrics["top1"] == 50.0 and metrics["top5"] == 100.0
    assert metrics["per_class"] == {"a": 100.0, "b": 50.0, "c": 0.0}
    assert metrics["predictions"] == [0, 2, 1, 1] and metrics["num_images"] == 4
    many = classification_metrics(torch.eye(6)[[5, 0]], torch.eye(6).flip(0), torch.tensor([0, 1]), list("abcdef"))
    assert many["top1"] == 50.0 and many["top5"] == 50.0  # image 1 is class 5 exactly: class 1 ranks last


def _manual_predictions(model, processor, tokenizer, paths, prompts_per_class):
    transform = ClipImageTransform.from_processor(processor)
    with torch.no_grad():
        pixels = torch.stack([transform(Image.open(p)) for p in paths])
        images = torch.nn.functional.normalize(model.get_image_features(pixel_values=pixels), dim=-1)
        classes = []
        for prompts in prompts_per_class:
            tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
            texts = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            classes.append(torch.nn.functional.normalize(texts, dim=-1).mean(0))
    return (images @ torch.nn.functional.normalize(torch.stack(classes), dim=-1).t()).argmax(1).tolist()


def test_image_folder_end_to_end(tiny_moe, class_folder):
    model, processor, tokenizer = tiny_moe
    templates = ["a photo of a {}.", "a {} in a picture."]
    result = zero_shot_classify(
        model, tokenizer, class_folder, None, templates, processor, batch_size=4, progress=False
    )
    names = ["blue thing", "green thing", "red thing"]
    assert list(result["per_class"]) == names and result["num_images"] == 6
    paths = sorted(str(p) for p in class_folder.rglob("*.*"))
    expected = _manual_predictions(
        model, processor, tokenizer, paths, [[t.format(n) for t in templates] for n in names]
    )
    assert result["predictions"] == expected
    labels = [0, 0, 1, 1, 2, 2]
    assert result["top1"] == pytest.approx(100 * sum(p == y for p, y in zip(expected, labels)) / 6)
    assert result["top5"] == 100.0
    with pytest.raises(ValueError, match="2 class names for 3 class folders"):
        zero_shot_classify(model, tokenizer, class_folder, ["a", "b"], templates, processor, progress=False)
    with pytest.raises(ValueError, match="must contain"):
        zero_shot_classify(model, tokenizer, class_folder, None, ["no placeholder"], processor, progress=False)


def test_per_attribute_accuracy_matches_classification(tiny_moe, tmp_path):
    model, processor, tokenizer = tiny_moe
    paths = write_shapes_dataset(tmp_path, 0, 16, image_size=32, seed=1, progress=False)
    results = per_attribute_accuracy(model, processor, tokenizer, paths["eval_attributes"], progress=False)
    assert set(results) == {"colour", "shape", "texture", "size", "position", "background", "mean"}
    assert results["mean"] == pytest.approx(sum(v for k, v in results.items() if k != "mean") / 6)
    samples = [s for s in load_attributes(paths["eval_attributes"])["samples"] if len(s["objects"]) == 1]
    transform = ClipImageTransform.from_processor(processor)
    dataset = [
        {
            "pixel_values": transform(Image.open(tmp_path / s["image"])),
            "label": torch.tensor(TEXTURES.index(s["objects"][0]["texture"])),
        }
        for s in samples
    ]
    texture = zero_shot_classify(model, tokenizer, dataset, TEXTURES, [ATTRIBUTE_PROMPTS["texture"]], progress=False)
    assert results["texture"] == pytest.approx(texture["top1"])


def test_caption_swap_mode_matches_manual_computation(tiny_moe, tmp_path):
    model, processor, tokenizer = tiny_moe
    paths = write_shapes_dataset(tmp_path, 0, 10, image_size=32, seed=2, progress=False)
    results = per_attribute_accuracy(
        model, processor, tokenizer, paths["eval_attributes"], mode="caption", progress=False
    )
    assert set(results) == {"colour", "shape", "texture", "size", "position", "background", "mean"}
    transform = ClipImageTransform.from_processor(processor)
    hits = 0
    for sample in load_attributes(paths["eval_attributes"])["samples"]:
        captions = swapped_captions(sample, "shape", SHAPES, sample_caption, set_object_attribute)
        assert captions[SHAPES.index(sample["objects"][0]["shape"])] == sample["caption"]
        tokens = tokenizer(captions, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
        with torch.no_grad():
            texts = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            image = model.get_image_features(pixel_values=transform(Image.open(tmp_path / sample["image"]))[None])
        scores = torch.nn.functional.normalize(texts, dim=-1) @ torch.nn.functional.normalize(image, dim=-1)[0]
        truth = SHAPES.index(sample["objects"][0]["shape"])
        hits += bool(scores[truth] > torch.cat([scores[:truth], scores[truth + 1 :]]).max())  # a tie is a miss
    assert results["shape"] == pytest.approx(100.0 * hits / 10)
    with pytest.raises(ValueError, match="mode"):
        per_attribute_accuracy(model, processor, tokenizer, paths["eval_attributes"], mode="other")


def test_caption_swap_mode_counts_a_tie_as_a_miss(tiny_moe, tmp_path, monkeypatch):
    model, processor, tokenizer = tiny_moe
    paths = write_shapes_dataset(tmp_path, 0, 6, image_size=32, seed=2, progress=False)
    one_embedding = lambda model, texts, *args, **kwargs: torch.ones(len(texts), 4)  # noqa: E731
    monkeypatch.setattr(classification, "encode_texts", one_embedding)
    monkeypatch.setattr(classification, "encode_images", lambda *args, **kwargs: torch.ones(6, 4))
    results = per_attribute_accuracy(
        model, processor, tokenizer, paths["eval_attributes"], mode="caption", progress=False
    )
    assert results == dict.fromkeys(["colour", "shape", "texture", "size", "position", "background", "mean"], 0.0)
