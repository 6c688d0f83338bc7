"""Image-text retrieval sets: images, their (possibly several) captions and the caption -> image map.

Formats: the Karpathy-split JSON of COCO / Flickr30k (``images[].filepath/filename/split/sentences[].raw``),
a generic JSON list (``image`` with ``caption`` or ``captions``; ShareGPT4V records also work), CSV/TSV
(one row per caption, rows sharing an image path are grouped) and img2dataset folders.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from mllm_encoder.data.records import (
    ImageTextRecord,
    PathLike,
    iter_table,
    load_json_records,
    read_image_folder,
    resolve_image_path,
)

RETRIEVAL_FORMATS = ("karpathy", "json", "sharegpt4v", "csv", "tsv", "folder")


@dataclass
class RetrievalSet:
    """``images[i]`` is a path; caption ``j`` describes image ``caption_image[j]``."""

    images: List[str] = field(default_factory=list)
    captions: List[str] = field(default_factory=list)
    caption_image: List[int] = field(default_factory=list)

    def add(self, image: str, captions: Sequence[str]) -> None:
        """Append an image with its captions."""
        self.images.append(image)
        self.captions.extend(captions)
        self.caption_image.extend([len(self.images) - 1] * len(captions))

    @classmethod
    def from_records(cls, records: Sequence[ImageTextRecord]) -> "RetrievalSet":
        """Group image-caption records by image path (first-seen order)."""
        grouped: Dict[str, List[str]] = {}
        for record in records:
            grouped.setdefault(record.image, []).append(record.caption)
        result = cls()
        for image, captions in grouped.items():
            result.add(image, captions)
        return result


def read_karpathy(path: PathLike, split: Optional[str] = "test", image_root: Optional[PathLike] = None) -> RetrievalSet:
    """Images of ``split`` (all if ``None``) of a Karpathy-split JSON; paths: ``root/filepath/filename``."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path}: not a Karpathy-split file (expected an object with an 'images' list)")
    root = Path(path).parent if image_root is None else Path(image_root)
    result = RetrievalSet()
    for index, image in enumerate(data["images"]):
        if split is not None and image.get("split") != split:
            continue
        sentences = image.get("sentences")
        if "filename" not in image or not isinstance(sentences, list) or not sentences:
            raise ValueError(f"{path}: images[{index}]: needs 'filename' and a non-empty 'sentences' list")
        try:
            captions = [sentence["raw"].strip() for sentence in sentences]
        except (TypeError, KeyError, AttributeError) as error:
            raise ValueError(f"{path}: images[{index}]: every sentence needs a string 'raw'") from error
        result.add(os.path.join(root, image.get("filepath", ""), image["filename"]), captions)
    if not result.images:
        raise ValueError(f"{path}: no images in split {split!r}")
    return result


def read_karpathy_records(
    path: PathLike, split: Optional[str] = "test", image_root: Optional[PathLike] = None
) -> List[ImageTextRecord]:
    """One image-caption record per sentence of a Karpathy-split file (for training or feature extraction)."""
    data = read_karpathy(path, split, image_root)
    return [
        ImageTextRecord(data.images[image], caption, f"{path}: {os.path.basename(data.images[image])} sentence {n}")
        for image, caption, n in zip(data.caption_image, data.captions, _sentence_numbers(data.caption_image))
    ]


def _sentence_numbers(caption_image: Sequence[int]) -> List[int]:
    numbers, previous, count = [], None, 0
    for image in caption_image:
        count = count + 1 if image == previous else 0
        numbers.append(count)
        previous = image
    return numbers


def _generic_captions(record: Any, where: str) -> List[str]:
    if isinstance(record.get("captions"), list):
        return [str(caption).strip() for caption in record["captions"]]
    if isinstance(record.get("caption"), str):
        return [record["caption"].strip()]
    turns = record.get("conversations")
    if isinstance(turns, list) and len(turns) > 1 and isinstance(turns[1], dict) and "value" in turns[1]:
        return [str(turns[1]["value"]).strip()]
    raise ValueError(f"{where}: needs 'caption', 'captions' or ShareGPT4V 'conversations'")


def read_json_pairs(
    path: PathLike, image_root: Optional[PathLike] = None, allow_absolute_paths: bool = False
) -> RetrievalSet:
    """A JSON(L) list of ``{"image", "caption" | "captions" | "conversations"}``; records merge per image."""
    root = Path(path).parent if image_root is None else image_root
    grouped: Dict[str, List[str]] = {}
    for index, record in enumerate(load_json_records(path)):
        where = f"{path}: record {index}"
        if not isinstance(record, dict) or not isinstance(record.get("image"), str):
            raise ValueError(f"{where}: expected an object with a string 'image'")
        captions = _generic_captions(record, where)
        if not captions or not all(captions):
            raise ValueError(f"{where}: empty caption")
        grouped.setdefault(resolve_image_path(record["image"], root, where, allow_absolute_paths), []).extend(captions)
    result = RetrievalSet()
    for image, captions in grouped.items():
        result.add(image, captions)
    return result


def _detect_retrieval_format(path: PathLike) -> str:
    if os.path.isdir(path):
        return "folder"
    suffix = Path(path).suffix.lower()
    if suffix in (".csv", ".tsv"):
        return suffix[1:]
    if suffix == ".json":
        with open(path, encoding="utf-8") as handle:
            head = handle.read(1024).lstrip()
        return "karpathy" if head.startswith("{") else "json"
    if suffix == ".jsonl":
        return "json"
    raise ValueError(f"cannot detect the retrieval format of {path}; pass one of {RETRIEVAL_FORMATS}")


def read_retrieval_set(
    path: PathLike,
    format: str = "auto",
    split: Optional[str] = "test",
    image_root: Optional[PathLike] = None,
    image_column: Optional[str] = None,
    caption_column: Optional[str] = None,
    allow_absolute_paths: bool = False,
) -> RetrievalSet:
    """Read a retrieval set in any supported format (``split`` only applies to Karpathy files).

    Image paths may not leave ``image_root``; absolute ones need ``allow_absolute_paths``.
    """
    format = _detect_retrieval_format(path) if format == "auto" else format
    if format == "karpathy":
        return read_karpathy(path, split, image_root)
    if format in ("json", "sharegpt4v"):
        return read_json_pairs(path, image_root, allow_absolute_paths)
    if format in ("csv", "tsv"):
        delimiter = "\t" if format == "tsv" else ","
        records = list(iter_table(path, delimiter, image_column, caption_column, image_root, allow_absolute_paths))
    elif format == "folder":
        records = read_image_folder(path)
    else:
        raise ValueError(f"unknown retrieval format {format!r}; expected 'auto' or one of {RETRIEVAL_FORMATS}")
    empty = next((record.source for record in records if not record.caption), None)
    if empty is not None:
        raise ValueError(f"{empty}: empty caption")
    return RetrievalSet.from_records(records)
