"""Reading image-caption records from ShareGPT4V/LLaVA JSON, img2dataset folders and CSV/TSV tables.

A record is an image path and a caption plus ``source``, the file and record index or line it came from,
so that every error and every skipped sample can be traced back to its origin.

A dataset keeps its records as a :class:`RecordIndex`: three UTF-8 string columns (image, caption, source),
each one bytes buffer plus an offsets array, so a process holds 24 bytes of offsets per sample and the
buffers can be memory-mapped from an index directory (:func:`build_record_index`), built once per run and
shared by every rank and stage.
"""

import array
import contextlib
import csv
import functools
import io
import itertools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import numpy as np

from mllm_encoder.atomic import PathLike, atomic_directory

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


JSON_CHUNK = 1 << 22  # characters read at a time when streaming a JSON list
_JSON_KINDS = {"{": "an object", '"': "a string", "t": "a boolean", "f": "a boolean", "n": "null"}


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def iter_json_records(path: PathLike) -> Iterator[Any]:
    """The records of a JSON list file or a JSON-lines file, one at a time (a JSON list is decoded element by
    element, so memory holds one chunk and one record, not the whole file); errors name the file and line."""
    path = Path(path)
    with path.open(encoding="utf-8") as handle:
        if path.suffix.lower() == ".jsonl":
            for line_number, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as error:
                        raise ValueError(f"{path}: line {line_number}: invalid JSON: {error.msg}") from error
            return
        decoder, text, position, lines_before, at_end = json.JSONDecoder(), "", 0, 0, False

        def more() -> bool:  # drop the decoded text (counting its lines), read the next chunk
            nonlocal text, position, lines_before, at_end
            lines_before += text.count("\n", 0, position)
            chunk = handle.read(JSON_CHUNK)
            text, position, at_end = text[position:] + chunk, 0, not chunk
            return bool(chunk)

        def fail(message: str, at: int) -> ValueError:
            return ValueError(f"{path}: line {lines_before + text.count(chr(10), 0, at) + 1}: invalid JSON: {message}")

        more()
        position = _skip_space(text, 0)
        if not text[position:]:
            raise fail("Expecting value", position)
        if text[position] != "[":
            kind = _JSON_KINDS.get(text[position], "a number")
            raise ValueError(f"{path}: expected a JSON list of records, got {kind}")
        position, first = position + 1, True
        while True:
            position = _skip_space(text, position)
            while position >= len(text) and more():
                position = _skip_space(text, position)
            if position >= len(text):
                raise fail("Expecting ',' delimiter or ']'", position)
            if text[position] == "]":
                break
            if not first:
                if text[position] != ",":
                    raise fail("Expecting ',' delimiter", position)
                position = _skip_space(text, position + 1)
            while True:  # a record cut by the chunk's end decodes once more text is read
                try:
                    record, end = decoder.raw_decode(text, _skip_space(text, position))
                    if end < len(text) or at_end or not more():  # a number at the text's end may go on
                        break
                except json.JSONDecodeError as error:
                    failure = fail(error.msg, error.pos)  # before more() moves the text
                    if at_end or not more():
                        raise failure from error
            yield record
            position, first = end, False
            if position > JSON_CHUNK:
                more()
        position = _skip_space(text, position + 1)
        while position >= len(text) and more():
            position = _skip_space(text, position)
        if position < len(text):
            raise fail("Extra data", position)


def load_json_records(path: PathLike) -> List[Any]:
    """The records of a JSON list file or a JSON-lines file, with errors naming the file and line."""
    return list(iter_json_records(path))


def _sharegpt4v_caption(record: Any, where: str) -> str:
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or len(conversations) < 2:
        raise ValueError(f"{where}: 'conversations' must be a list of at least 2 turns")
    answer = conversations[1]
    if not isinstance(answer, dict) or not isinstance(answer.get("value"), str):
        raise ValueError(f"{where}: conversations[1] must be an object with a string 'value'")
    return answer["value"].strip()


def iter_sharegpt4v(
    path: PathLike, image_root: Optional[PathLike] = None, allow_absolute_paths: bool = False
) -> Iterator[ImageTextRecord]:
    """Records of a ShareGPT4V/LLaVA conversation JSON, one at a time: ``image`` and ``conversations[1].value``.

    Text-only conversations (no ``image`` key) are skipped with a warning; a malformed record raises a
    ``ValueError`` naming the file and the record index. ``image_root`` defaults to the JSON's folder; see
    :func:`resolve_image_path` for the paths accepted.
    """
    image_root = Path(path).parent if image_root is None else image_root
    text_only = 0
    for index, record in enumerate(iter_json_records(path)):
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
        yield ImageTextRecord(image, caption, where)
    if text_only:
        logger.warning("%s: skipped %d text-only records without an 'image'", path, text_only)


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


def iter_table(
    path: PathLike,
    delimiter: Optional[str] = None,
    image_column: Optional[str] = None,
    caption_column: Optional[str] = None,
    image_root: Optional[PathLike] = None,
    allow_absolute_paths: bool = False,
) -> Iterator[ImageTextRecord]:
    """Records of a CSV/TSV file with a header row, one at a time; ``image_root`` defaults to the file's folder."""
    path = Path(path)
    delimiter = delimiter or ("\t" if path.suffix.lower() == ".tsv" else ",")
    image_root = path.parent if image_root is None else image_root
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
            yield ImageTextRecord(image, caption.strip(), where)


def read_image_text_records(
    path: PathLike,
    format: str = "auto",
    image_root: Optional[PathLike] = None,
    image_column: Optional[str] = None,
    caption_column: Optional[str] = None,
    allow_absolute_paths: bool = False,
) -> List[ImageTextRecord]:
    """Records of a map-style dataset in any supported on-disk format (not webdataset); never empty."""
    records = list(
        iter_image_text_records(path, format, image_root, image_column, caption_column, allow_absolute_paths)
    )
    if not records:
        raise ValueError(f"{path}: no image-caption records (an empty training list)")
    return records


def iter_image_text_records(
    path: PathLike,
    format: str = "auto",
    image_root: Optional[PathLike] = None,
    image_column: Optional[str] = None,
    caption_column: Optional[str] = None,
    allow_absolute_paths: bool = False,
) -> Iterator[ImageTextRecord]:
    """The records of :func:`read_image_text_records`, one at a time (possibly none)."""
    format = detect_format(path) if format == "auto" else format
    if format == "sharegpt4v":
        return iter_sharegpt4v(path, image_root, allow_absolute_paths)
    if format == "folder":
        return iter(read_image_folder(path))
    if format in ("csv", "tsv"):
        delimiter = "\t" if format == "tsv" else ","
        return iter_table(path, delimiter, image_column, caption_column, image_root, allow_absolute_paths)
    raise ValueError(f"unknown map-style dataset format {format!r}; expected one of {FORMATS[:-1]}")


_COLUMNS = ("image", "caption", "source")


@dataclass(frozen=True)
class StringColumn:
    """Strings stored as one UTF-8 buffer and ``[n + 1]`` offsets: string ``i`` is ``data[offsets[i]:offsets[i+1]]``."""

    offsets: np.ndarray  # int64 [n + 1]
    data: np.ndarray  # uint8, possibly memory-mapped

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> str:
        return self.data[self.offsets[index] : self.offsets[index + 1]].tobytes().decode("utf-8")


def _write_columns(records: Iterable[ImageTextRecord], sinks: Dict[str, BinaryIO]) -> Dict[str, np.ndarray]:
    """Append each record's fields (UTF-8) to the column sinks; returns each column's ``[n + 1]`` offsets."""
    ends = {name: array.array("q", [0]) for name in _COLUMNS}
    for record in records:
        for name in _COLUMNS:
            encoded = getattr(record, name).encode("utf-8")
            sinks[name].write(encoded)
            ends[name].append(ends[name][-1] + len(encoded))
    return {name: np.frombuffer(ends[name], dtype=np.int64).copy() for name in _COLUMNS}


INDEX_META = "meta.json"  # written last: an index directory without it is incomplete


class RecordIndex:
    """The records of a map-style dataset as compact string columns; ``index[i]`` is an :class:`ImageTextRecord`.

    ``stamp`` describes what the index was built from (the data file, its size and modification time, the
    reader's options); :func:`build_record_index` reuses a saved index only when it matches.
    """

    def __init__(self, columns: Dict[str, StringColumn], stamp: Optional[Dict[str, Any]] = None) -> None:
        lengths = {len(column) for column in columns.values()}
        assert set(columns) == set(_COLUMNS) and len(lengths) == 1, "one string column per field, equally long"
        self.columns, self.stamp = columns, dict(stamp or {})

    @classmethod
    def from_records(cls, records: Iterable[ImageTextRecord], stamp: Optional[Dict[str, Any]] = None):
        """The index of records (a list or a stream), in memory."""
        sinks = {name: io.BytesIO() for name in _COLUMNS}
        offsets = _write_columns(records, sinks)
        data = {name: np.frombuffer(sink.getbuffer(), dtype=np.uint8) for name, sink in sinks.items()}
        return cls({name: StringColumn(offsets[name], data[name]) for name in _COLUMNS}, stamp)

    @classmethod
    def write(
        cls, records: Iterable[ImageTextRecord], directory: PathLike, stamp: Optional[Dict[str, Any]] = None
    ) -> "RecordIndex":
        """Write the index of records (a list or a stream) to ``directory`` (replaced atomically) as they come,
        so memory holds only the offsets; returns it memory-mapped (:meth:`load`)."""
        with atomic_directory(directory, overwrite=True) as staging:
            with contextlib.ExitStack() as files:
                sinks = {name: files.enter_context(open(staging / f"{name}_data.bin", "wb")) for name in _COLUMNS}
                offsets = _write_columns(records, sinks)
            for name in _COLUMNS:
                np.save(staging / f"{name}_offsets.npy", offsets[name])
            meta = {"num_records": len(offsets["image"]) - 1, "stamp": dict(stamp or {})}
            (staging / INDEX_META).write_text(json.dumps(meta, indent=2) + "\n")
        return cls.load(directory)

    @classmethod
    def load(cls, directory: PathLike) -> "RecordIndex":
        """A saved index, its string buffers memory-mapped (read-only, shared by every process that maps them)."""
        directory = Path(directory)
        meta = json.loads((directory / INDEX_META).read_text())
        columns = {}
        for name in _COLUMNS:
            offsets = np.load(directory / f"{name}_offsets.npy")
            path = directory / f"{name}_data.bin"
            data = np.memmap(path, dtype=np.uint8, mode="r") if offsets[-1] else np.zeros(0, np.uint8)
            columns[name] = StringColumn(offsets, data)
        index = cls(columns, meta["stamp"])
        if len(index) != meta["num_records"]:
            raise ValueError(f"{directory}: the index holds {len(index)} records, its {INDEX_META} says otherwise")
        return index

    def __len__(self) -> int:
        return len(self.columns["image"])

    def __getitem__(self, index: int) -> ImageTextRecord:
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} out of range for {len(self)} records")
        index = index % len(self)
        return ImageTextRecord(*(self.columns[name][index] for name in _COLUMNS))

    def __iter__(self) -> Iterator[ImageTextRecord]:
        return (self[i] for i in range(len(self)))

    def caption(self, index: int) -> str:
        """The caption of record ``index`` (without decoding the image path and source)."""
        return self.columns["caption"][index]


def record_stamp(path: PathLike, format: str, **options: Any) -> Dict[str, Any]:
    """What a record index of ``path`` depends on: its absolute path, size and modification time (a folder: its
    file count and newest modification time), the format, the reader's ``options`` and the working directory
    (relative image paths are kept relative to it)."""
    path = Path(path)
    if path.is_dir():
        times = [entry.stat().st_mtime_ns for entry in path.rglob("*")] + [path.stat().st_mtime_ns]
        size, mtime_ns = len(times), max(times)
    else:
        stat = path.stat()
        size, mtime_ns = stat.st_size, stat.st_mtime_ns
    stamp = {"path": str(path.resolve()), "size": size, "mtime_ns": mtime_ns, "format": format, **options}
    return {**stamp, "cwd": os.getcwd()}


def record_index_stamp(
    path: PathLike,
    format: str,
    image_root: Optional[PathLike] = None,
    image_column: Optional[str] = None,
    caption_column: Optional[str] = None,
    allow_absolute_paths: bool = False,
) -> Dict[str, Any]:
    """The stamp :func:`build_record_index` saves with (and checks) an index built with these arguments (empty
    when ``path`` does not exist)."""
    if not os.path.exists(path):
        return {}
    options = dict(image_root=None if image_root is None else os.fspath(image_root), image_column=image_column)
    options.update(caption_column=caption_column, allow_absolute_paths=allow_absolute_paths)
    return record_stamp(path, format, **options)


def saved_record_index(directory: PathLike, stamp: Dict[str, Any]) -> Optional[RecordIndex]:
    """The index saved in ``directory`` when it was built from what ``stamp`` describes, else ``None``."""
    meta = Path(directory) / INDEX_META
    if not stamp or not meta.is_file():
        return None
    try:
        saved = json.loads(meta.read_text()).get("stamp")
    except (OSError, json.JSONDecodeError):
        return None
    return RecordIndex.load(directory) if saved == stamp else None


def build_record_index(
    path: PathLike,
    format: str = "auto",
    image_root: Optional[PathLike] = None,
    image_column: Optional[str] = None,
    caption_column: Optional[str] = None,
    allow_absolute_paths: bool = False,
    index_dir: Optional[PathLike] = None,
) -> RecordIndex:
    """The :class:`RecordIndex` of a map-style dataset (see :func:`read_image_text_records` for the arguments).

    With ``index_dir``: an index saved there from the same file and options is reused (memory-mapped);
    otherwise the records are read, saved there and memory-mapped back. Without it the index lives in memory.
    """
    format = detect_format(path) if format == "auto" else format
    stamp = record_index_stamp(path, format, image_root, image_column, caption_column, allow_absolute_paths)
    if index_dir is not None:
        saved = saved_record_index(index_dir, stamp)
        if saved is not None:
            logger.info("%s: reusing the record index in %s", path, index_dir)
            return saved
    records = iter_image_text_records(path, format, image_root, image_column, caption_column, allow_absolute_paths)
    first = next(records, None)  # the file opens and its first record reads before anything is written
    if first is None:
        raise ValueError(f"{path}: no image-caption records (an empty training list)")
    records = itertools.chain([first], records)
    if index_dir is None:
        return RecordIndex.from_records(records, stamp)
    return RecordIndex.write(records, index_dir, stamp)


def index_bytes(index: RecordIndex) -> int:
    """Bytes of ``index`` a process holds in memory (offsets; memory-mapped buffers excluded)."""
    resident = 0
    for column in index.columns.values():
        resident += column.offsets.nbytes + (0 if isinstance(column.data, np.memmap) else column.data.nbytes)
    return resident
