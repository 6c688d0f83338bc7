"""The synthetic shapes set: deterministic, loadable by the ShareGPT4V loader, captions match attributes."""

import json
from pathlib import Path

import numpy as np
from data_helpers import folder_digest
from PIL import Image

from mllm_encoder.data import load_image_text_dataset
from mllm_encoder.data.synthetic import (
    ATTRIBUTE_PROMPTS,
    ATTRIBUTES,
    COLOURS,
    describe,
    load_attributes,
    render_image,
    single_object_labels,
    write_shapes_dataset,
)


def test_deterministic_by_seed(tmp_path):
    first = write_shapes_dataset(tmp_path / "a", 40, 10, seed=3, progress=False)
    write_shapes_dataset(tmp_path / "b", 40, 10, seed=3, progress=False)
    write_shapes_dataset(tmp_path / "c", 40, 10, seed=4, progress=False)
    assert folder_digest(tmp_path / "a") == folder_digest(tmp_path / "b") != folder_digest(tmp_path / "c")
    assert set(first) == {"train", "eval", "train_attributes", "eval_attributes", "image_root"}


def test_captions_and_attributes_agree(tmp_path, image_processor, clip_tokenizer):
    paths = write_shapes_dataset(tmp_path, 60, 20, image_size=48, progress=False)
    train = json.loads(Path(paths["train"]).read_text())
    attributes = load_attributes(paths["train_attributes"])
    assert len(train) == len(attributes["samples"]) == 60
    counts = {1: 0, 2: 0}
    for record, sample in zip(train, attributes["samples"]):
        caption = record["conversations"][1]["value"]
        counts[len(sample["objects"])] += 1
        assert sample["background"] in caption and record["image"] == sample["image"]
        assert sample["caption"] == caption == describe(sample["objects"], sample["background"], sample["template"])
        for obj in sample["objects"]:
            assert (
                f"a {obj['size']} {obj['colour']} {obj['texture']} {obj['shape']} in the {obj['position']}" in caption
            )
        with Image.open(tmp_path / record["image"]) as image:
            assert image.size == (48, 48) and image.mode == "RGB"
    assert counts[1] > 20 and counts[2] > 10
    dataset = load_image_text_dataset(paths["eval"], image_processor=image_processor, tokenizer=clip_tokenizer)
    assert len(dataset) == 20 and dataset[19]["index"] == 19
    labels = single_object_labels(attributes, "texture")
    assert 0 < len(labels) < 60 and all(value in ATTRIBUTES["texture"] for _, value in labels)
    assert len(single_object_labels(attributes, "background")) == 60
    assert set(ATTRIBUTE_PROMPTS) == set(ATTRIBUTES)


def test_rendering_draws_the_named_colour_and_texture():
    rng = np.random.default_rng(0)
    obj = {"colour": "red", "shape": "square", "texture": "solid", "size": "large", "position": "top left"}
    pixels = np.asarray(render_image([obj], "dark", rng, 64)).astype(int)
    assert np.abs(pixels[16, 16] - np.array(COLOURS["red"])).max() == 0
    assert pixels[48, 48].max() < 120  # dark background in the bottom right quadrant
    striped = dict(obj, texture="striped")
    patch = np.asarray(render_image([striped], "light", rng, 64)).astype(int)[12:20, 12:20, 0]
    assert patch.max() == COLOURS["red"][0] and patch.min() == round(0.45 * COLOURS["red"][0])
    assert (
        describe([obj], "dark", template=0)
        == "a photo of a large red solid square in the top left on a dark background."
    )
