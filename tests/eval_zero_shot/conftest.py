"""Fixtures for the zero-shot evaluation tests: a loaded tiny CLIP-MoE and small image sets on disk."""

import json

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def tiny_moe(tiny_clip_moe_dir):
    """``(model, image_processor, tokenizer)`` of the tiny CLIP-MoE checkpoint (4 experts, top-2)."""
    from mllm_encoder.cli.eval_zero_shot import load_model_and_processors

    return load_model_and_processors(str(tiny_clip_moe_dir), "cpu")


def _image(seed: int, size=(40, 34)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8), mode="RGB")


@pytest.fixture
def karpathy_set(tmp_path):
    """A Karpathy-split JSON: 3 test images (2, 3 and 1 captions) and 1 train image, under val2014/."""
    (tmp_path / "val2014").mkdir()
    captions = {
        "a.jpg": ["a red circle on the left", "a red round shape"],
        "b.jpg": ["a blue striped square", "stripes of blue", "a square with stripes"],
        "c.jpg": ["a green dotted triangle"],
        "d.jpg": ["a training image"],
    }
    images = []
    for seed, (name, sentences) in enumerate(captions.items()):
        _image(seed).save(tmp_path / "val2014" / name)
        split = "train" if name == "d.jpg" else "test"
        sentences = [{"raw": s, "tokens": s.split()} for s in sentences]
        images.append({"filepath": "val2014", "filename": name, "split": split, "sentences": sentences})
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    return tmp_path, captions


@pytest.fixture
def class_folder(tmp_path):
    """An image folder with three classes (``red_thing``, ``blue_thing``, ``green_thing``), 2 images each."""
    root = tmp_path / "classes"
    for name, colour in {"blue_thing": (0, 0, 255), "green_thing": (0, 255, 0)}.items():
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (36, 32), colour).save(root / name / f"{i}.png")
    (root / "red_thing").mkdir()
    for i in range(2):
        _image(10 + i).save(root / "red_thing" / f"{i}.jpg")
    return root
