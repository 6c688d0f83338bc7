"""The PIL image transform equals CLIPImageProcessor; captions are padded/truncated to the context length."""

import numpy as np
import pytest
import torch
from data_helpers import random_image
from PIL import Image

from mllm_encoder.data import ClipImageTransform, ClipTextTokenizer

SIZES = [(32, 32), (57, 41), (41, 90), (200, 120), (33, 500), (20, 25)]


def _pil_processor_class():
    import transformers

    return getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}},
        {"size": {"shortest_edge": 24}, "crop_size": {"height": 28, "width": 20}},
        {"size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 32}, "image_mean": [0.5] * 3},
    ],
)
def test_transform_equals_pil_clip_image_processor(kwargs):
    processor = _pil_processor_class()(**kwargs)
    transform = ClipImageTransform.from_processor(processor)
    rng = np.random.default_rng(1)
    images = [random_image(rng, w, h) for w, h in SIZES]
    images.append(random_image(rng, 50, 45).convert("L"))
    expected = processor(images=images, return_tensors="pt")["pixel_values"]
    ours = torch.stack([transform(image) for image in images])
    assert ours.dtype == torch.float32 and ours.shape == expected.shape
    torch.testing.assert_close(ours, expected.float(), rtol=0, atol=1e-6)


def test_transform_close_to_torchvision_backend():
    """transformers 5 defaults to a torchvision backend: its bicubic resize differs from PIL's by rounding."""
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    transform = ClipImageTransform.from_processor(processor)
    rng = np.random.default_rng(2)
    for width, height in SIZES[:5]:
        image = Image.fromarray(
            np.repeat(np.repeat(rng.integers(0, 256, (height // 4 + 1, width // 4 + 1, 3)), 4, 0), 4, 1)[
                :height, :width
            ].astype(np.uint8)
        )
        expected = processor(images=[image], return_tensors="pt")["pixel_values"][0]
        difference = (transform(image) - expected).abs()
        assert difference.mean() < 0.02 and difference.max() < 0.25


def test_default_transform_is_openai_clip_224():
    transform = ClipImageTransform()
    out = transform(Image.new("RGB", (300, 250), (255, 0, 0)))
    assert out.shape == (3, 224, 224)
    expected = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(transform.mean)) / torch.tensor(transform.std)
    torch.testing.assert_close(out[:, 100, 100], expected)


def test_text_tokenizer_pads_and_truncates(clip_tokenizer):
    tokenize = ClipTextTokenizer(clip_tokenizer, context_length=8)
    long_caption = "a very long caption with many more words than the context length allows"
    out = tokenize(["a red circle", long_caption])
    assert out["input_ids"].shape == (2, 8) and out["input_ids"].dtype == torch.long
    bos, eos = clip_tokenizer.bos_token_id, clip_tokenizer.eos_token_id
    short_ids = clip_tokenizer("a red circle")["input_ids"]
    assert out["input_ids"][0, : len(short_ids)].tolist() == short_ids
    assert out["attention_mask"][0].tolist() == [1] * len(short_ids) + [0] * (8 - len(short_ids))
    assert out["input_ids"][1, 0] == bos and out["input_ids"][1, -1] == eos
    assert out["attention_mask"][1].tolist() == [1] * 8


def test_context_length_defaults_to_tokenizer_limit(clip_tokenizer):
    assert ClipTextTokenizer(clip_tokenizer).context_length == 77
    with pytest.raises(ValueError, match="context_length"):
        ClipTextTokenizer(clip_tokenizer, context_length=1)
