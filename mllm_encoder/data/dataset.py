"""Map-style image-caption dataset, the bad-sample-aware collator and ``load_image_text_dataset``."""

import logging
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image
from torch.utils.data import Dataset

from mllm_encoder.data.preprocess import ClipImageTransform, ClipTextTokenizer
from mllm_encoder.data.records import ImageTextRecord, RecordIndex

logger = logging.getLogger(__name__)

Sample = Dict[str, Any]
MAX_REMEMBERED_BAD = 1000  # bad samples kept for error messages; all of them are counted


class BadSampleFractionError(ValueError):
    """Raised when more than the allowed fraction of samples is unreadable."""


class BadSampleLog:
    """Counts bad samples and remembers the first ones (index, source, reason) for error messages."""

    def __init__(self) -> None:
        self.reset_bad_samples()

    def reset_bad_samples(self) -> None:
        """Forget the bad samples counted so far (a new stage of a run counts its own)."""
        self.num_bad = 0
        self.bad_samples: List[Tuple[int, str, str]] = []

    def mark_bad(self, index: int, source: str, reason: str) -> None:
        """Count one bad sample and log a warning naming it."""
        self.num_bad += 1
        if len(self.bad_samples) < MAX_REMEMBERED_BAD:
            self.bad_samples.append((index, source, reason))
        logger.warning("skipping sample %d (%s): %s", index, source, reason)


def load_image(path: str) -> Image.Image:
    """Open and fully decode an image file (truncated files fail here, not later)."""
    with Image.open(path) as image:
        image.load()
        return image.copy()


def encode_sample(
    index: int, image: Image.Image, caption: str, transform: Callable, text_tokenizer: ClipTextTokenizer
) -> Sample:
    """The sample dict: ``index``, ``pixel_values`` [3,H,W], ``input_ids`` [L], ``attention_mask`` [L]."""
    tokens = text_tokenizer([caption])
    return {
        "index": index,
        "pixel_values": transform(image),
        "input_ids": tokens["input_ids"][0],
        "attention_mask": tokens["attention_mask"][0],
    }


class ImageTextDataset(Dataset, BadSampleLog):
    """Image-caption pairs read from disk and preprocessed for a CLIP checkpoint.

    ``dataset[i]`` is a sample dict whose ``index`` is ``i`` (``records[i].source`` names the file and
    record it came from), or ``None`` when the image is missing/corrupt or the caption empty; such
    samples are counted in ``num_bad`` and listed in ``bad_samples`` (per process). The records are kept
    as a compact :class:`RecordIndex` (a list of records is converted).
    """

    def __init__(
        self,
        records: Union[RecordIndex, Sequence[ImageTextRecord]],
        transform: Callable,
        text_tokenizer: ClipTextTokenizer,
    ):
        BadSampleLog.__init__(self)
        self.records = records if isinstance(records, RecordIndex) else RecordIndex.from_records(records)
        self.transform = transform
        self.text_tokenizer = text_tokenizer

    def __len__(self) -> int:
        return len(self.records)

    @property
    def captions(self) -> List[str]:
        """The caption of every sample, in index order."""
        return [self.records.caption(i) for i in range(len(self.records))]

    def __getitem__(self, index: int) -> Optional[Sample]:
        record = self.records[index]
        if not record.caption:
            self.mark_bad(index, record.source, "empty caption")
            return None
        try:
            image = load_image(record.image)
        except Exception as error:  # any decoding failure of one file must not stop a long run
            self.mark_bad(index, record.source, f"cannot read image {record.image}: {error}")
            return None
        return encode_sample(index, image, record.caption, self.transform, self.text_tokenizer)


class ImageTextCollator:
    """Batches sample dicts, dropping ``None`` (bad) samples and stopping when too many are bad.

    Raises ``BadSampleFractionError`` once at least ``min_samples`` samples were seen and more than
    ``max_bad_fraction`` of them were bad (call ``check()`` at the end of an epoch to enforce the
    fraction on short runs too). Returns ``None`` for a batch whose samples were all bad. With several
    data-loader workers each worker counts its own share. Pass the dataset to name the failed files.
    """

    def __init__(self, max_bad_fraction: float = 0.01, min_samples: int = 100, dataset: Optional[Any] = None):
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.max_bad_fraction = max_bad_fraction
        self.min_samples = min_samples
        self.dataset = dataset
        self.num_seen = 0
        self.num_bad = 0

    def check(self, final: bool = True) -> None:
        """Raise if the bad fraction is exceeded (before ``min_samples`` only when ``final``)."""
        if self.num_bad == 0 or (not final and self.num_seen < self.min_samples):
            return
        if self.num_bad <= self.max_bad_fraction * self.num_seen:
            return
        failed = getattr(self.dataset, "bad_samples", [])
        listing = "; ".join(f"{source}: {reason}" for _, source, reason in failed[:20]) or "see the warnings above"
        raise BadSampleFractionError(
            f"{self.num_bad} of {self.num_seen} samples were bad (more than {self.max_bad_fraction:.2%}): {listing}"
        )

    def __call__(self, samples: Sequence[Optional[Sample]]) -> Optional[Dict[str, torch.Tensor]]:
        good = [sample for sample in samples if sample is not None]
        self.num_seen += len(samples)
        self.num_bad += len(samples) - len(good)
        self.check(final=False)
        if not good:
            return None
        return {
            "index": torch.tensor([sample["index"] for sample in good], dtype=torch.long),
            "pixel_values": torch.stack([sample["pixel_values"] for sample in good]),
            "input_ids": torch.stack([sample["input_ids"] for sample in good]),
            "attention_mask": torch.stack([sample["attention_mask"] for sample in good]),
        }


def build_transforms(
    image_processor: Any, tokenizer: Any, context_length: Optional[int] = None
) -> Tuple[ClipImageTransform, ClipTextTokenizer]:
    """The image transform and caption tokenizer for a checkpoint's processor and tokenizer."""
    if image_processor is None or tokenizer is None:
        raise ValueError("image_processor and tokenizer are required (see mllm_encoder.checkpoint.load_processors)")
    return ClipImageTransform.from_processor(image_processor), ClipTextTokenizer(tokenizer, context_length)
