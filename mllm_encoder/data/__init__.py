"""Image-caption data: on-disk formats, CLIP preprocessing, bad-sample handling and synthetic demo data."""

import os
from typing import Any, Optional, Sequence, Union

from mllm_encoder.data.dataset import (
    BadSampleFractionError,
    ImageTextCollator,
    ImageTextDataset,
    build_transforms,
)
from mllm_encoder.data.preprocess import ClipImageTransform, ClipTextTokenizer, resolve_context_length
from mllm_encoder.data.records import (
    FORMATS,
    ImageTextRecord,
    RecordIndex,
    build_record_index,
    detect_format,
    read_image_text_records,
)
from mllm_encoder.data.retrieval_sets import read_karpathy_records
from mllm_encoder.data.webdataset import TarShardDataset, WebDatasetImageText, build_shard_index, expand_shards


def load_image_text_dataset(
    path: Union[str, os.PathLike, Sequence[str]],
    format: str = "auto",
    image_root: Optional[Union[str, os.PathLike]] = None,
    image_processor: Any = None,
    tokenizer: Any = None,
    image_column: Optional[str] = None,
    caption_column: Optional[str] = None,
    context_length: Optional[int] = None,
    split: Optional[str] = "test",
    random_access: bool = False,
    allow_absolute_paths: bool = False,
    index_dir: Optional[Union[str, os.PathLike]] = None,
    **webdataset_kwargs: Any,
) -> Union[ImageTextDataset, WebDatasetImageText, TarShardDataset]:
    """Load an image-caption dataset preprocessed for a CLIP checkpoint.

    ``format``: ``auto`` (from the path), ``sharegpt4v`` (LLaVA conversation JSON/JSONL), ``folder``
    (img2dataset files), ``csv``/``tsv`` (``image_column``/``caption_column``, guessed when omitted),
    ``karpathy`` (COCO/Flickr30k Karpathy-split JSON, one sample per sentence of ``split``) or
    ``webdataset`` (tar shards: streaming, extra keyword arguments go to ``WebDatasetImageText``; with
    ``random_access`` the map-style ``TarShardDataset`` over local shards, what DMU trains on).
    ``image_processor`` is a ``CLIPImageProcessor`` (or ``ClipImageTransform``), ``tokenizer`` the
    checkpoint's tokenizer; captions are padded/truncated to ``context_length`` (default: the
    tokenizer's ``model_max_length``). Image paths are relative to ``image_root`` (default: the file's
    folder) and may not leave it; ``allow_absolute_paths`` accepts absolute paths in the data file.
    ``index_dir``: where the index of a map-style dataset (records, or tar-shard member offsets) is saved
    and reused (see :func:`build_record_index`, :func:`build_shard_index`); default: kept in memory.
    """
    format = detect_format(path) if format == "auto" else format
    if format not in FORMATS:
        raise ValueError(f"unknown dataset format {format!r}; expected 'auto' or one of {FORMATS}")
    transform, text_tokenizer = build_transforms(image_processor, tokenizer, context_length)
    if format == "webdataset":
        if random_access:
            return TarShardDataset(path, transform, text_tokenizer, index_dir=index_dir, **webdataset_kwargs)
        return WebDatasetImageText(path, transform, text_tokenizer, **webdataset_kwargs)
    if webdataset_kwargs:
        raise ValueError(f"unexpected arguments for format {format!r}: {sorted(webdataset_kwargs)}")
    if format == "karpathy":
        records = read_karpathy_records(path, split, image_root)
    else:
        records = build_record_index(
            path, format, image_root, image_column, caption_column, allow_absolute_paths, index_dir
        )
    return ImageTextDataset(records, transform, text_tokenizer)


__all__ = [
    "BadSampleFractionError",
    "ClipImageTransform",
    "ClipTextTokenizer",
    "ImageTextCollator",
    "ImageTextDataset",
    "ImageTextRecord",
    "RecordIndex",
    "TarShardDataset",
    "WebDatasetImageText",
    "build_record_index",
    "build_shard_index",
    "build_transforms",
    "detect_format",
    "expand_shards",
    "load_image_text_dataset",
    "read_image_text_records",
    "resolve_context_length",
]
