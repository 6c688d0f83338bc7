"""Write a tiny CLIP-MoE checkpoint, or read one and report what it computes, in whichever environment runs this.

``python tests/portability_probe.py WRITTEN_ELSEWHERE WRITE_HERE REPORT.json`` is the half of
``tests/test_environments.py`` that runs in the other environment (:func:`main`).
"""

import json
import sys
from pathlib import Path
from typing import Any, Dict

import torch
import transformers
from PIL import Image
from tiny_models import tiny_clip_moe_config
from transformers import AutoTokenizer

from mllm_encoder import CLIPMoEModel
from mllm_encoder.checkpoint import load_processors, save_checkpoint
from mllm_encoder.conversion.tokenizer import build_clip_tokenizer
from mllm_encoder.loading import load_clip_moe

TEXTS = ["a photo of a cat", "Two RED cubes, left of a sphere!"]


def write(directory: Path) -> None:
    """A tiny CLIP-MoE (seed 0) with the OpenAI CLIP tokenizer (context 16) and its image processor."""
    torch.manual_seed(0)
    save_checkpoint(CLIPMoEModel(tiny_clip_moe_config()), directory, tokenizer=build_clip_tokenizer(16))


def read(directory: Path) -> Dict[str, Any]:
    """Token ids (fast and slow tokenizer) and image/text features of the checkpoint in ``directory``."""
    model = load_clip_moe(directory).eval()
    image_processor, tokenizer = load_processors(directory)
    slow = AutoTokenizer.from_pretrained(directory, use_fast=False)
    image = Image.new("RGB", (48, 40), (200, 30, 60))
    pixel_values = image_processor(images=[image], return_tensors="pt")["pixel_values"]
    ids = tokenizer(TEXTS, padding="max_length", truncation=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        image_features = model.get_image_features(pixel_values=pixel_values)
        text_features = model.get_text_features(input_ids=ids)
    return {
        "transformers": transformers.__version__,
        "ids": [tokenizer(text)["input_ids"] for text in TEXTS],
        "slow_ids": [slow(text)["input_ids"] for text in TEXTS],
        "image_features": getattr(image_features, "pooler_output", image_features).tolist(),
        "text_features": getattr(text_features, "pooler_output", text_features).tolist(),
    }


def main(written_elsewhere: Path, written_here: Path, report: Path) -> None:
    """Read the checkpoint ``written_elsewhere``, write one to ``written_here`` and read it; both reports go to
    ``report`` (JSON ``{"elsewhere": ..., "here": ...}``)."""
    elsewhere = read(written_elsewhere)
    write(written_here)
    report.write_text(json.dumps({"elsewhere": elsewhere, "here": read(written_here)}))


if __name__ == "__main__":
    main(*map(Path, sys.argv[1:4]))
