"""Reading image-caption records from ShareGPT4V/LLaVA JSON, img2dataset folders and CSV/TSV tables.

A record is an image path and a caption plus ``source``, the file and record index or line it came from,
so that every error and every skipped sample can be traced back to its origin.
"""

import csv
import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

from mllm_encoder.atomic import PathLike

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
IMAGE_COLUMNS = ("image", "filepath", "file_path", "image_path", "filename", "file_name", "path", "img")
CAPTION_COLUMNS = ("caption", "text", "title", "sentence", "description", "txt")
FORMATS = ("sharegpt4v", "folder", "csv", "tsv", "karpathy", "webdataset")


@dataclass(frozen=True)
class ImageTextRecord:
    """One image-caption pair; ``source`` names the file and record/line it was read from."""

    image: str
    caption: str
    source: str


def detect_format(path: Union[PathLike, Sequence[PathLike]]) -> str:
    """Guess the dataset format from ``path``: a folder, a .json/.jsonl, .csv, .tsv or .tar shard(s)."""
    if isinstance(path, (list, tuple)):
        return "webdataset"
    text = str(path)
    if text.endswith(".tar") or "{" in text or "::" in text:
        return "webdataset"
    if os.path.isdir(text):
        return "folder"
    suffix = Path(text).suffix.lower()
    formats = {".json": "sharegpt4v", ".jsonl": "sharegpt4v", ".csv": "csv", ".tsv": "tsv"}
    if suffix not in formats:
        raise ValueError(f"cannot detect the dataset format of {text!r}; pass format= one of {FORMATS}")
    return formats[suffix]


ABSOLUTE_PATHS_HINT = "pass allow_absolute_paths=True (--allow-absolute-image-paths) to accept absolute paths"


def resolve_image_path(
    image: str, image_root: Optional[PathLike], where: str = "image path", allow_absolute: bool = False
) -> str:
    """``image`` joined to ``image_root`` (default: the working directory); ``where`` names the record in errors.

    Raises:
        ValueError: when the path leaves ``image_root`` (``../``, or a symbolic link leading outside it), or is
            absolute, and ``allow_absolute`` is False: a data file must not make us read arbitrary files.
    """
    if os.path.isabs(image):
        if not allow_absolute:
            raise ValueError(f"{where}: absolute image path {image!r} refused; {ABSOLUTE_PATHS_HINT}")
        return image
    relative = os.path.normpath(image)
    if relative == os.pardir or relative.startswith(os.pardir + os.sep):
        raise ValueError(f"{where}: image path {image!r} leaves the image root {os.fspath(image_root or '.')!r}")
    path = relative if image_root is None else os.path.join(os.fspath(image_root), relative)
    root = _real_root(os.path.abspath(image_root or "."))
    if not allow_absolute and os.path.commonpath([root, os.path.realpath(path)]) != root:
        raise ValueError(
            f"{where}: image path {image!r} is a symbolic link (or lies under one) that leads outside the image root "
            f"{os.fspath(image_root or '.')!r}; pass allow_absolute_paths=True (--allow-absolute-image-paths) to "
            "read outside it"
        )
    return path


@functools.lru_cache(maxsize=16)
def _real_root(root: str) -> str:
    return os.path.realpath(root)


def load_json_records(path: PathLike) -> List[Any]:
    """The records of a JSON list file or a JSON-lines file, with errors naming the file and line."""
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        records = []
        with path.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise ValueError(f"{path}: line {line_number}: invalid JSON: {error.msg}") from error
        return records
    try:
        with path.open(encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: line {error.lineno}: invalid JSON: {error.msg}") from error
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _sharegpt4v_caption(record: Any, where: str) -> str:
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or len(conversations) < 2:
        raise ValueError(f"{where}: 'conversations' must be a list of at least 2 turns")
    answer = conversations[1]
    if not isinstance(answer, dict) or not isinstance(answer.get("value"), str):
        raise ValueError(f"{where}: conversations[1] must be an object with a string 'value'")
    return answer["value"].strip()


def read_sharegpt4v(
    path: PathLike, image_root: Optional[PathLike] = None, allow_absolute_paths: bool = False
) -> List[ImageTextRecord]:
    """Records of a ShareGPT4V/LLaVA conversation JSON: ``image`` and ``conversations[1].value``.

    Text-only conversations (no ``image`` key) are skipped with a warning; a malformed record raises a
    ``ValueError`` naming the file and the record index. ``image_root`` defaults to the JSON's folder; see
    :func:`resolve_image_path` for the paths accepted.
    """
    image_root = Path(path).parent if image_root is None else image_root
    records, text_only = [], 0
    for index, record in enumerate(load_json_records(path)):
        where = f"{path}: record {index}"
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected an object, got {type(record).__name__}")
        if "image" not in record:
            text_only += 1
            continue
        if not isinstance(record["image"], str):
            raise ValueError(f"{where}: 'image' must be a string path, got {type(record['image']).__name__}")
        caption = _sharegpt4v_caption(record, where)
        image = resolve_image_path(record["image"], image_root, where, allow_absolute_paths)
        records.append(ImageTextRecord(image, caption, where))
    if text_only:
        logger.warning("%s: skipped %d text-only records without an 'image'", path, text_only)
    return records


def read_image_folder(root: PathLike) -> List[ImageTextRecord]:
    """Records of an img2dataset "files" folder: ``name.jpg`` with its caption in ``name.txt``.

    Shard sub-folders are searched recursively; files are sorted so the order (and the sample index) is
    stable. An image without a caption file gets an empty caption (a bad sample, counted when loaded).
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: not a directory")
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    records = []
    for image in images:
        caption_file = image.with_suffix(".txt")
        caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else ""
        records.append(ImageTextRecord(str(image), caption, str(image)))
    if not records:
        raise ValueError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    return records


def _pick_column(header: Sequence[str], requested: Optional[str], candidates: Sequence[str], what: str, path) -> str:
    if requested is not None:
        if requested not in header:
            raise ValueError(f"{path}: no {what} column {requested!r}; columns are {list(header)}")
        return requested
    lowered = {name.lower(): name for name in header}
    for candidate in candidates:
        if candidate in lowered:
            return lowered[candidate]
    raise ValueError(f"{path}: cannot find the {what} column among {list(header)}; pass it explicitly")


def read_table(
    path: PathLike,
    delimiter: Optional[str] = None,
    image_column: Optional[str] = None,
    caption_column: Optional[str] = None,
    image_root: Optional[PathLike] = None,
    allow_absolute_paths: bool = False,
) -> List[ImageTextRecord]:
    """Records of a CSV/TSV file with a header row; ``image_root`` defaults to the file's folder."""
    path = Path(path)
    delimiter = delimiter or ("\t" if path.suffix.lower() == ".tsv" else ",")
    image_root = path.parent if image_root is None else image_root
    records = []
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        if not reader.fieldnames:
            raise ValueError(f"{path}: empty file, expected a header row")
        image_key = _pick_column(reader.fieldnames, image_column, IMAGE_COLUMNS, "image", path)
        caption_key = _pick_column(reader.fieldnames, caption_column, CAPTION_COLUMNS, "caption", path)
        for row in reader:
            where = f"{path}: line {reader.line_num}"
            image, caption = row.get(image_key), row.get(caption_key)
            if image is None or caption is None:
                raise ValueError(f"{where}: row has fewer fields than the header")
            if not image.strip():
                raise ValueError(f"{where}: empty image path")
            image = resolve_image_path(image.strip(), image_root, where, allow_absolute_paths)
            records.append(ImageTextRecord(image, caption.strip(), where))
    return records


def read_image_text_records(
    path: PathLike,
    format: str = "auto",
    image_root: Optional[PathLike] = None,
    image_column: Optional[str] = None,
    caption_column: Optional[str] = None,
    allow_absolute_paths: bool = False,
) -> List[ImageTextRecord]:
    """Records of a map-style dataset in any supported on-disk format (not webdataset); never empty."""
    format = detect_format(path) if format == "auto" else format
    if format == "sharegpt4v":
        records = read_sharegpt4v(path, image_root, allow_absolute_paths)
    elif format == "folder":
        records = read_image_folder(path)
    elif format in ("csv", "tsv"):
        delimiter = "\t" if format == "tsv" else ","
        records = read_table(path, delimiter, image_column, caption_column, image_root, allow_absolute_paths)
    else:
        raise ValueError(f"unknown map-style dataset format {format!r}; expected one of {FORMATS[:-1]}")
    if not records:
        raise ValueError(f"{path}: no image-caption records (an empty training list)")
    return records
