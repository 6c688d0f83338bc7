"""Image and text preprocessing matching a checkpoint's ``CLIPImageProcessor`` and tokenizer.

The image transform is written with PIL and NumPy only, so it runs in data-loader workers without
touching transformers, and reproduces the PIL code path of ``CLIPImageProcessor`` exactly: convert to RGB,
resize the shortest side (bicubic by default), center crop (zero padding when the crop is larger), rescale
by 1/255 and normalise with the checkpoint's mean and standard deviation.
"""

import logging
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from mllm_encoder.checkpoint import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

logger = logging.getLogger(__name__)

_LARGE_CONTEXT = 100_000  # tokenizers without a real limit report ~1e30 as model_max_length


def _size_field(size: Any, key: str) -> Optional[int]:
    """Read ``key`` from a size given as a dict, a transformers ``SizeDict`` or an int."""
    if size is None:
        return None
    if isinstance(size, int):
        return size
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


def convert_to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of ``image``; transparent pixels are composited over white (as transformers does)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "P") and (image.mode != "P" or "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


@dataclass
class ClipImageTransform:
    """PIL image -> normalised ``[3, H, W]`` float tensor, equal to ``CLIPImageProcessor``'s PIL path."""

    shortest_edge: Optional[int] = 224
    resize_hw: Optional[Tuple[int, int]] = None
    crop_hw: Optional[Tuple[int, int]] = (224, 224)
    resample: int = Image.BICUBIC
    rescale_factor: float = 1 / 255
    do_rescale: bool = True
    mean: Sequence[float] = OPENAI_CLIP_MEAN
    std: Sequence[float] = OPENAI_CLIP_STD
    do_normalize: bool = True

    @classmethod
    def from_processor(cls, processor: Any) -> "ClipImageTransform":
        """Build the transform from a (transformers) ``CLIPImageProcessor`` or a compatible object."""
        if isinstance(processor, ClipImageTransform):
            return processor
        size = processor.size if getattr(processor, "do_resize", True) else None
        shortest = _size_field(size, "shortest_edge")
        height, width = _size_field(size, "height"), _size_field(size, "width")
        # SigLIP's processor resizes to a square and has no crop at all (no crop_size attribute)
        crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", True) else None
        crop_hw = (_size_field(crop, "height"), _size_field(crop, "width")) if crop is not None else None
        resample = getattr(processor, "resample", Image.BICUBIC)
        return cls(
            shortest_edge=shortest,
            resize_hw=(height, width) if shortest is None and height and width else None,
            crop_hw=crop_hw,
            resample=int(getattr(resample, "value", resample)),
            rescale_factor=float(getattr(processor, "rescale_factor", 1 / 255)),
            do_rescale=bool(getattr(processor, "do_rescale", True)),
            mean=tuple(processor.image_mean),
            std=tuple(processor.image_std),
            do_normalize=bool(getattr(processor, "do_normalize", True)),
        )

    def _resize(self, image: Image.Image) -> Image.Image:
        if self.resize_hw is not None:
            height, width = self.resize_hw
        elif self.shortest_edge is not None:
            short, long = sorted(image.size)
            new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
            width, height = (new_short, new_long) if image.width <= image.height else (new_long, new_short)
        else:
            return image
        if (width, height) == image.size:
            return image
        return image.resize((width, height), resample=self.resample)

    def _center_crop(self, array: np.ndarray) -> np.ndarray:
        crop_h, crop_w = self.crop_hw
        height, width = array.shape[:2]
        if crop_h > height or crop_w > width:
            padded = np.zeros((max(crop_h, height), max(crop_w, width), array.shape[2]), dtype=array.dtype)
            top, left = (padded.shape[0] - height) // 2, (padded.shape[1] - width) // 2
            padded[top : top + height, left : left + width] = array
            array, height, width = padded, padded.shape[0], padded.shape[1]
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        return array[top : top + crop_h, left : left + crop_w]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Transform one PIL image."""
        array = np.asarray(self._resize(convert_to_rgb(image)))
        if self.crop_hw is not None:
            array = self._center_crop(array)
        if self.do_rescale:  # float64 product then float32, as transformers does
            array = (array.astype(np.float64) * self.rescale_factor).astype(np.float32)
        array = array.astype(np.float32)
        if self.do_normalize:
            array = (array - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def resolve_context_length(tokenizer: Any, context_length: Optional[int] = None) -> int:
    """The text length to pad and truncate to: ``context_length`` or the tokenizer's ``model_max_length``."""
    if context_length is not None:
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2, got {context_length}")
        return int(context_length)
    length = getattr(tokenizer, "model_max_length", None)
    if length is None or length > _LARGE_CONTEXT:
        raise ValueError(
            "the tokenizer has no usable model_max_length; pass context_length "
            "(the text tower's max_position_embeddings)"
        )
    return int(length)


class ClipTextTokenizer:
    """Captions -> ``input_ids``/``attention_mask``, padded to and truncated at the context length."""

    def __init__(self, tokenizer: Any, context_length: Optional[int] = None):
        self.tokenizer = tokenizer
        self.context_length = resolve_context_length(tokenizer, context_length)

    def __call__(self, texts: Sequence[str]) -> Dict[str, torch.Tensor]:
        """Tokenise a list of captions into ``[N, L]`` long tensors."""
        encoded = self.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.context_length,
            return_tensors="pt",
        )
        return {"input_ids": encoded["input_ids"].long(), "attention_mask": encoded["attention_mask"].long()}
