"""Image-caption samples from webdataset tar shards (img2dataset's ``webdataset`` output).

Members sharing a key (the path up to the first dot of the file name) form one sample: an image
(``jpg``/``jpeg``/``png``/``webp``) and a caption (``txt``). Two views of the same shards:

- :class:`WebDatasetImageText` streams them with the `webdataset` package: brace patterns, ``::``-joined
  lists, ``pipe:`` and ``http(s)://`` URLs, shards split over ranks and data-loader workers, shard
  shuffling per epoch and resampling with replacement. Sample index ``shard_number * shard_stride +
  position_in_shard``.
- :class:`TarShardDataset` is map-style over local ``.tar`` files: each shard's member offsets are read
  once (per run with an index directory, the ranks splitting the shards: :func:`build_shard_index`), then
  ``dataset[i]`` seeks to the sample. This is what DMU trains on (one-cluster
  batches, features keyed by index). Sample index: contiguous over the shards in order.

Nothing is lost silently. An undecodable image, a missing caption or image, and every sample a damaged
shard lost are counted (``num_bad``) and named (``bad_samples``); the loaders yield ``None`` for them so the
collator applies ``max_bad_fraction``. A shard's sample count comes from ``sizes.json`` next to the shards
(``{"shard-000.tar": 10000, ...}``, open_clip's convention) or img2dataset's ``<shard>_stats.json``
(``successes``); with it, a truncated or unreadable shard accounts for exactly the samples it lost. Without
it, such a shard counts one bad sample and is listed in ``lost_shards`` ("unknown number of samples").
"""

import bisect
import collections
import functools
import glob
import hashlib
import io
import itertools
import json
import logging
import os
import tarfile
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, IterableDataset

from mllm_encoder.atomic import atomic_write_bytes, atomic_write_json
from mllm_encoder.data.dataset import BadSampleLog, Sample, encode_sample
from mllm_encoder.data.preprocess import ClipTextTokenizer

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEYS = ("txt", "caption", "text")
SIZES_FILE = "sizes.json"
UNKNOWN_REST = "samples from position {position} on lost (unknown number; add sizes.json to count them)"
_END_OF_ARCHIVE = bytes(2 * tarfile.BLOCKSIZE)  # two zero blocks close every complete tar file
ShardSpec = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


def _wds():
    try:
        import webdataset
    except ImportError as error:
        raise ImportError(
            f"reading webdataset shards needs the webdataset package: pip install webdataset ({error})"
        ) from error
    return webdataset


def _is_url(shard: str) -> bool:
    return shard.startswith("pipe:") or "://" in shard


def expand_shards(shards: ShardSpec) -> List[str]:
    """Shard paths or URLs from brace patterns (``{000..009}``), ``::``-joined lists, local globs or a list.

    Local paths must exist (a ``ValueError`` names the missing ones); ``pipe:`` and URL shards are opened
    when read.
    """
    if isinstance(shards, (list, tuple)):
        patterns = [os.fspath(shard) for shard in shards]
    else:
        patterns = _wds().shardlists.expand_urls(os.fspath(shards))
    paths: List[str] = []
    for pattern in patterns:
        if not _is_url(pattern) and glob.has_magic(pattern):
            paths.extend(sorted(glob.glob(pattern)))
        else:
            paths.append(pattern)
    if not paths:
        raise ValueError(f"no webdataset shards match {shards!r}")
    missing = [path for path in paths if not _is_url(path) and not os.path.isfile(path)]
    if missing:
        raise ValueError(f"webdataset shards not found: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return paths


def read_shard_sizes(shards: Sequence[str]) -> Dict[str, int]:
    """The known sample count of each local shard: ``sizes.json`` in its folder or img2dataset's stats file."""
    sizes: Dict[str, int] = {}
    manifests: Dict[str, Dict[str, Any]] = {}
    for shard in shards:
        if _is_url(shard):
            continue
        folder, name = os.path.split(shard)
        if folder not in manifests:
            manifest = os.path.join(folder, SIZES_FILE)
            manifests[folder] = _read_json(manifest) if os.path.isfile(manifest) else {}
        count, source = manifests[folder].get(name), os.path.join(folder, SIZES_FILE)
        stats = os.path.join(folder, name.rsplit(".", 1)[0] + "_stats.json")
        if count is None and os.path.isfile(stats):
            count, source = _read_json(stats).get("successes"), stats
        if count is not None:
            if not isinstance(count, int) or count < 0:
                raise ValueError(f"{source}: the sample count of {name} must be a non-negative integer, got {count!r}")
            sizes[shard] = count
    return sizes


def _read_json(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a JSON file ({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _pick(keys: Iterable[str], preferred: Sequence[str]) -> Optional[str]:
    return next((key for key in preferred if key in keys), None)


class _SampleDecoder(BadSampleLog):
    """Turns the raw members of one sample into a sample dict, or ``None`` (counted and named) when bad."""

    def __init__(self, transform: Callable, text_tokenizer: ClipTextTokenizer) -> None:
        BadSampleLog.__init__(self)
        self.transform, self.text_tokenizer = transform, text_tokenizer

    def decode(self, index: int, source: str, parts: Dict[str, bytes]) -> Optional[Sample]:
        caption_key, image_key = _pick(parts, CAPTION_KEYS), _pick(parts, IMAGE_KEYS)
        caption = parts[caption_key].decode("utf-8", errors="replace").strip() if caption_key else ""
        if image_key is None:
            self.mark_bad(index, source, "no image member")
            return None
        if not caption:
            self.mark_bad(index, source, "empty or missing caption")
            return None
        try:
            with Image.open(io.BytesIO(parts[image_key])) as image:
                image.load()
                image = image.copy()
        except Exception as error:  # one undecodable image must not stop a long run
            self.mark_bad(index, source, f"cannot decode image: {error}")
            return None
        return encode_sample(index, image, caption, self.transform, self.text_tokenizer)

    def mark_lost(self, index: int, shard: str, position: int, reason: str, size_known: bool) -> None:
        """Count one sample a damaged shard lost; without the shard's size it stands for the unknown rest."""
        if not size_known:
            reason += f"; {UNKNOWN_REST.format(position=position)}"
        self.mark_bad(index, f"{shard}: sample {position}", f"lost: {reason}")


class _TailReader:
    """A read-only stream that remembers its first bytes and its last 1024 (to check a tar file's end)."""

    COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")  # gzip, bzip2, xz: they detect truncation themselves

    def __init__(self, stream, name: str) -> None:
        self.stream, self.name, self.head, self.tail = stream, name, b"", b""

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        if len(self.head) < 8:
            self.head = (self.head + data)[:8]
        self.tail = (self.tail + data)[-len(_END_OF_ARCHIVE) :]
        return data

    def ends_complete(self) -> bool:
        """Whether the whole stream was a complete tar file (read it to its end first)."""
        while self.read(1 << 16):
            pass
        return self.tail == _END_OF_ARCHIVE or self.head.startswith(self.COMPRESSED)

    def close(self) -> None:
        self.stream.close()

    def __str__(self) -> str:
        return self.name


def _stream_samples(stream: _TailReader) -> Iterator[Tuple[str, Dict[str, bytes]]]:
    """``(key, {extension: bytes})`` of consecutive members of one tar stream; raises on damage.

    A sample is yielded once the next key's header is read, so damage loses only the sample being read:
    a truncated or garbled archive raises ``tarfile.TarError``/``OSError``/``EOFError``; an uncompressed
    archive without its end-of-archive blocks (cut at a member boundary) raises ``tarfile.ReadError``
    instead of yielding its last sample, which may be incomplete.
    """
    base_plus_ext = _wds().tariterators.base_plus_ext
    key, parts = None, {}
    with tarfile.open(fileobj=stream, mode="r|*") as archive:
        for member in archive:
            archive.members = []  # a streamed archive need not remember its members
            prefix, extension = base_plus_ext(member.name) if member.isreg() else (None, None)
            if prefix is None:
                continue
            if key is not None and prefix != key:
                yield key, parts
                parts = {}
            key = prefix
            parts[extension.lower()] = archive.extractfile(member).read()
    if not stream.ends_complete():
        raise tarfile.ReadError("the archive ends without its end-of-archive blocks (truncated)")
    if key is not None:
        yield key, parts


class _DecodedShards:
    """The bad-sample record of a shard reader, kept by its :class:`_SampleDecoder` (``self.decoder``)."""

    decoder: _SampleDecoder

    @property
    def num_bad(self) -> int:
        return self.decoder.num_bad

    @property
    def bad_samples(self) -> List[Tuple[int, str, str]]:
        return self.decoder.bad_samples

    def reset_bad_samples(self) -> None:
        """Forget the bad samples counted so far (a new stage of a run counts its own)."""
        self.decoder.reset_bad_samples()


class WebDatasetImageText(_DecodedShards, IterableDataset):
    """Streams tar shards (the `webdataset` package), yielding the sample dicts of ``ImageTextDataset``.

    Args:
        shards: see :func:`expand_shards` (``pipe:`` commands run through the shell: trusted input only).
        rank, world_size: this process's share of the shards. ``None`` (default): read them from
            ``torch.distributed`` or the ``RANK``/``WORLD_SIZE`` variables (webdataset's ``split_by_node``).
            Shards are always split over data-loader workers.
        shuffle_shards: shuffle the shard order with ``seed + epoch`` (the same order on every rank).
        resampled: draw shards with replacement, endlessly (each rank and worker with its own seed);
            bound an epoch by the number of batches.
        shard_sizes: sample count per shard (default: :func:`read_shard_sizes`), used to count every
            sample a damaged shard lost.

    A bad sample yields ``None`` (counted in ``num_bad``, named in ``bad_samples``); so does every lost
    sample of a damaged shard (see the module docstring). Counts are per process (and per worker).
    """

    def __init__(
        self,
        shards: ShardSpec,
        transform: Callable,
        text_tokenizer: ClipTextTokenizer,
        shard_stride: int = 1_000_000,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        shuffle_shards: bool = False,
        resampled: bool = False,
        seed: int = 0,
        shard_sizes: Optional[Dict[str, int]] = None,
    ):
        if (rank is None) != (world_size is None):
            raise ValueError("pass both rank and world_size, or neither")
        if world_size is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.shards = expand_shards(shards)
        self.decoder = _SampleDecoder(transform, text_tokenizer)
        self.lost_shards: List[Tuple[str, str]] = []  # damaged shards of unknown size: (shard, what was lost)
        self.sizes = read_shard_sizes(self.shards) if shard_sizes is None else dict(shard_sizes)
        too_big = [shard for shard, size in self.sizes.items() if size > shard_stride]
        if too_big:
            raise ValueError(f"{too_big[0]}: {self.sizes[too_big[0]]} samples, more than shard_stride={shard_stride}")
        self.shard_stride, self.rank, self.world_size = shard_stride, rank, world_size
        self.shuffle_shards, self.resampled, self.seed, self.epoch = shuffle_shards, resampled, seed, 0
        self._numbers = {shard: number for number, shard in enumerate(self.shards)}

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that seeds the shard order (``shuffle_shards``) and the resampling."""
        self.epoch = epoch

    def split_index(self, index: int) -> Tuple[str, int]:
        """The shard and the position inside it of a sample index."""
        return self.shards[index // self.shard_stride], index % self.shard_stride

    def _shard_stream(self) -> Iterator[str]:
        wds = _wds()
        if self.resampled:
            rank = self.rank if self.rank is not None else wds.utils.pytorch_worker_info()[0]
            seeds = functools.partial(_worker_seed, rank, wds)
            urls = wds.ResampledShards(self.shards, seed=self.seed + self.epoch, worker_seed=seeds, deterministic=True)
            yield from (item["url"] for item in urls)
            return
        seed = self.seed + self.epoch if self.shuffle_shards else None
        urls: Iterator[Dict[str, str]] = iter(wds.SimpleShardList(self.shards, seed=seed))
        if self.world_size is None:
            urls = wds.split_by_node(urls)
        else:
            urls = itertools.islice(urls, self.rank, None, self.world_size)
        yield from (item["url"] for item in wds.split_by_worker(urls))

    def _read_shard(self, shard: str) -> Iterator[Optional[Sample]]:
        base, expected, position, reason = self._numbers[shard] * self.shard_stride, self.sizes.get(shard), 0, None
        try:
            stream = _TailReader(_wds().gopen(shard), shard)
            try:
                for key, parts in _stream_samples(stream):
                    if position >= self.shard_stride:
                        raise ValueError(f"{shard}: more than shard_stride={self.shard_stride} samples")
                    yield self.decoder.decode(base + position, f"{shard}: {key}", parts)
                    position += 1
            finally:
                stream.close()
        except (OSError, EOFError, tarfile.TarError) as error:
            reason = f"unreadable shard ({error})"
        if expected is not None and position > expected:
            logger.warning("%s: %d samples, but its size manifest says %d", shard, position, expected)
        if reason is None and (expected is None or position >= expected):
            return
        reason = reason or f"the shard holds {position} of the {expected} samples its size manifest lists"
        if expected is None:
            self.lost_shards.append((shard, f"{reason}; {UNKNOWN_REST.format(position=position)}"))
        for lost in range(position, max(expected or 0, position + 1)):
            self.decoder.mark_lost(base + lost, shard, lost, reason, size_known=expected is not None)
            yield None

    def __iter__(self) -> Iterator[Optional[Sample]]:
        for shard in self._shard_stream():
            yield from self._read_shard(shard)


def _worker_seed(rank: int, wds) -> int:
    return rank * 1000 + wds.utils.pytorch_worker_info()[2]


@dataclass(frozen=True)
class ShardIndex:
    """Where each sample's image and caption bytes lie in one local tar file.

    ``entries`` is a structured array, one row per sample: ``key`` (bytes), ``image`` and ``caption``
    (``[offset, size]``; ``-1`` when the member is absent); ``damage`` says why the shard ended early, or None.
    """

    entries: np.ndarray
    damage: Optional[str]

    def __len__(self) -> int:
        return len(self.entries)

    def key(self, position: int) -> str:
        """The webdataset key of the sample at ``position``."""
        return self.entries["key"][position].decode("utf-8", errors="replace")


def _entries(keys: List[str], image: List[Tuple[int, int]], caption: List[Tuple[int, int]]) -> np.ndarray:
    encoded = [key.encode("utf-8") for key in keys]
    width = max((len(key) for key in encoded), default=1)
    dtype = np.dtype([("key", f"S{max(width, 1)}"), ("image", "<i8", (2,)), ("caption", "<i8", (2,))])
    entries = np.zeros(len(keys), dtype=dtype)
    entries["key"] = encoded
    entries["image"] = np.asarray(image, dtype=np.int64).reshape(-1, 2)
    entries["caption"] = np.asarray(caption, dtype=np.int64).reshape(-1, 2)
    return entries


def index_shard(path: str) -> ShardIndex:
    """Member offsets of a local tar file, read from its headers only (a compressed shard is refused)."""
    keys: List[str] = []
    image: List[Tuple[int, int]] = []
    caption: List[Tuple[int, int]] = []
    members: Dict[str, Tuple[int, int]] = {}
    damage = None
    size = os.stat(path).st_size

    def close_sample() -> None:
        if keys and len(image) < len(keys):
            image.append(members.get(_pick(members, IMAGE_KEYS), (-1, -1)))
            caption.append(members.get(_pick(members, CAPTION_KEYS), (-1, -1)))

    with open(path, "rb") as handle:
        if handle.read(8).startswith(_TailReader.COMPRESSED):
            raise ValueError(f"{path}: a compressed shard; random access (DMU) needs uncompressed .tar files")
    base_plus_ext = _wds().tariterators.base_plus_ext
    try:
        with tarfile.open(path, mode="r:") as archive:
            for member in archive:
                prefix, extension = base_plus_ext(member.name) if member.isreg() else (None, None)
                if prefix is None:
                    continue
                if not keys or prefix != keys[-1]:
                    close_sample()
                    keys.append(prefix)
                    members = {}
                if member.offset_data + member.size > size:
                    raise tarfile.ReadError(f"member {member.name} is cut off")
                members[extension.lower()] = (member.offset_data, member.size)
        with open(path, "rb") as handle:
            handle.seek(max(0, size - len(_END_OF_ARCHIVE)))
            if handle.read() != _END_OF_ARCHIVE:
                raise tarfile.ReadError("the archive ends without its end-of-archive blocks (truncated)")
    except (OSError, EOFError, tarfile.TarError) as error:
        damage = f"unreadable shard ({error})"
        if keys and len(image) < len(keys):
            keys.pop()  # the sample being read when the damage was found may be incomplete
    close_sample()
    return ShardIndex(_entries(keys, image, caption), damage)


def _index_files(shard: str, index_dir: Union[str, os.PathLike]) -> Tuple[str, str]:
    """The ``.npy`` (entries) and ``.json`` (damage; written last) index files of one shard version: named by the
    shard's absolute path, size and modification time, so a changed shard is indexed again."""
    path, stat = os.path.abspath(shard), os.stat(shard)
    digest = hashlib.sha1(path.encode("utf-8")).hexdigest()[:16]
    stem = os.path.join(os.fspath(index_dir), f"{os.path.basename(path)}-{digest}-{stat.st_size}-{stat.st_mtime_ns}")
    return stem + ".npy", stem + ".json"


def saved_shard_index(shard: str, index_dir: Union[str, os.PathLike]) -> Optional[ShardIndex]:
    """The index of ``shard`` saved in ``index_dir`` for its current version (memory-mapped), else ``None``."""
    entries_file, meta_file = _index_files(shard, index_dir)
    if not os.path.isfile(meta_file):
        return None
    meta = _read_json(meta_file)
    entries = np.load(entries_file, mmap_mode="r" if meta["num_samples"] else None)
    return ShardIndex(entries, meta["damage"])


def save_shard_index(shard: str, index: ShardIndex, index_dir: Union[str, os.PathLike]) -> None:
    """Write the index of ``shard`` to ``index_dir`` (the entries first, then the JSON that completes it)."""
    entries_file, meta_file = _index_files(shard, index_dir)
    buffer = io.BytesIO()
    np.save(buffer, index.entries)
    atomic_write_bytes(entries_file, buffer.getvalue())
    atomic_write_json(meta_file, {"shard": os.path.abspath(shard), "num_samples": len(index), "damage": index.damage})


def build_shard_index(
    shards: ShardSpec, index_dir: Union[str, os.PathLike], rank: int = 0, world_size: int = 1
) -> List[str]:
    """Index this rank's share (``shards[rank::world_size]``) of local tar shards into ``index_dir``.

    Shards whose current version is indexed there already are skipped (a resumed run re-reads nothing).
    Every rank of a run calls this, then waits for the others; afterwards :class:`TarShardDataset` with the
    same ``index_dir`` maps every shard's index instead of reading the shards' headers. Returns the shards
    this call indexed.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    indexed = []
    for shard in expand_shards(shards)[rank::world_size]:
        if _is_url(shard):
            raise ValueError(f"random access (DMU training) needs local .tar shards, got {shard!r}")
        if not os.path.isfile(_index_files(shard, index_dir)[1]):
            save_shard_index(shard, index_shard(shard), index_dir)
            indexed.append(shard)
    return indexed


class TarShardDataset(_DecodedShards, Dataset):
    """Map-style random access to local tar shards: ``dataset[i]`` is the sample dict of index ``i`` or ``None``.

    The shards' member offsets are read once (headers only): from ``index_dir`` when given (written there by
    :func:`build_shard_index`, or here for the shards missing), else into memory; samples are read with
    one seek each, in any order, from any data-loader worker. Indices run over the shards in order and
    include the lost samples of damaged shards (always ``None``, counted and named when fetched; a damaged
    shard of unknown size has one such entry), so ``len()`` counts every sample the shards should hold.
    ``pipe:``/URL shards need streaming (:class:`WebDatasetImageText`) or a local copy.

    Each process keeps its shard files open between reads (the ``MAX_OPEN_SHARDS`` most recently read): they
    open on first use, a forked or spawned data-loader worker opens its own, and :meth:`close` (or garbage
    collection) closes them. One object reads from one thread at a time, as a data-loader worker does.
    """

    MAX_OPEN_SHARDS = 64

    def __init__(
        self,
        shards: ShardSpec,
        transform: Callable,
        text_tokenizer: ClipTextTokenizer,
        shard_sizes: Optional[Dict[str, int]] = None,
        index_dir: Optional[Union[str, os.PathLike]] = None,
    ):
        self.shards = expand_shards(shards)
        remote = [shard for shard in self.shards if _is_url(shard)]
        if remote:
            raise ValueError(
                f"random access (DMU training) needs local .tar shards, got {remote[0]!r}; copy the shards to a "
                "local or shared file system first"
            )
        self.decoder = _SampleDecoder(transform, text_tokenizer)
        self.lost_shards: List[Tuple[str, str]] = []  # damaged shards of unknown size: (shard, what was lost)
        sizes = read_shard_sizes(self.shards) if shard_sizes is None else dict(shard_sizes)
        if index_dir is not None:
            build_shard_index(self.shards, index_dir)  # only the shards no rank has indexed
            self.indices = [saved_shard_index(shard, index_dir) for shard in self.shards]
        else:
            self.indices = [index_shard(shard) for shard in self.shards]
        self.sizes_known = [shard in sizes for shard in self.shards]
        lengths = []
        for shard, index in zip(self.shards, self.indices):
            found, expected = len(index), sizes.get(shard)
            if expected is not None and expected < found:
                logger.warning("%s: %d samples, but its size manifest says %d", shard, found, expected)
            if index.damage is not None and expected is None:
                self.lost_shards.append((shard, f"{index.damage}; {UNKNOWN_REST.format(position=found)}"))
                expected = found + 1
            lengths.append(max(found, expected or 0))
        self.starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).tolist()
        self._open_files: collections.OrderedDict[int, BinaryIO] = collections.OrderedDict()
        self._owner_pid = os.getpid()

    def __len__(self) -> int:
        return self.starts[-1]

    def _file(self, number: int) -> BinaryIO:
        """This process's open file of shard ``number``, opened on first use and kept (least recently read
        closed first). Files inherited through ``fork`` are closed here, never read: their offset is shared."""
        if self._owner_pid != os.getpid():
            self.close()
            self._owner_pid = os.getpid()
        handle = self._open_files.pop(number, None)
        if handle is None:
            if len(self._open_files) >= self.MAX_OPEN_SHARDS:
                self._open_files.popitem(last=False)[1].close()
            handle = open(self.shards[number], "rb")
        self._open_files[number] = handle
        return handle

    def close(self) -> None:
        """Close the shard files this process has open (a later read opens them again)."""
        open_files, self._open_files = self._open_files, collections.OrderedDict()
        for handle in open_files.values():
            handle.close()

    def __del__(self) -> None:
        if hasattr(self, "_open_files"):  # not when __init__ failed
            self.close()

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_open_files"] = collections.OrderedDict()  # a spawned worker opens its own files
        return state

    def _locate(self, index: int) -> Tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample index {index} out of range for {len(self)} samples")
        number = bisect.bisect_right(self.starts, index) - 1
        return number, index - self.starts[number]

    def split_index(self, index: int) -> Tuple[str, int]:
        """The shard and the position inside it of a sample index."""
        number, position = self._locate(index)
        return self.shards[number], position

    def __getitem__(self, index: int) -> Optional[Sample]:
        number, position = self._locate(index)
        shard, shard_index = self.shards[number], self.indices[number]
        if position >= len(shard_index):
            reason = shard_index.damage or "the shard holds fewer samples than its size manifest lists"
            self.decoder.mark_lost(index, shard, position, reason, self.sizes_known[number])
            return None
        parts = {}
        handle = self._file(number)
        for key, (offset, size) in (
            (IMAGE_KEYS[0], shard_index.entries["image"][position]),
            (CAPTION_KEYS[0], shard_index.entries["caption"][position]),
        ):
            if offset >= 0:
                handle.seek(offset)
                parts[key] = handle.read(size)
        return self.decoder.decode(index, f"{shard}: {shard_index.key(position)}", parts)
