"""Streaming image-caption samples from webdataset tar shards (img2dataset's ``webdataset`` output).

Shards are read sequentially with :mod:`tarfile` in streaming mode, so nothing is extracted and any
number of samples can be read. Members sharing a key (the path up to the first dot of the file name)
form one sample: an image (``jpg``/``jpeg``/``png``/``webp``) and a caption (``txt``). The stable sample
index is ``shard_number * shard_stride + position_in_shard``.
"""

import glob
import io
import logging
import os
import re
import tarfile
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image
from torch.utils.data import IterableDataset

from mllm_encoder.data.dataset import BadSampleLog, Sample, encode_sample
from mllm_encoder.data.preprocess import ClipTextTokenizer

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEYS = ("txt", "caption", "text")
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> List[str]:
    """Expand ``{000..009}`` ranges (zero padding kept) and ``{a,b}`` alternatives, like webdataset."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end() :]
    range_match = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if range_match:
        start, end = range_match.groups()
        width = len(start) if start.startswith("0") else 0
        options = [str(n).zfill(width) for n in range(int(start), int(end) + 1)]
    else:
        options = body.split(",")
    return [expanded for option in options for expanded in expand_braces(head + option + tail)]


def expand_shards(shards: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]) -> List[str]:
    """Shard paths from a brace pattern, a glob, ``::``-joined patterns or a list of paths."""
    patterns = [os.fspath(s) for s in shards] if isinstance(shards, (list, tuple)) else os.fspath(shards).split("::")
    paths: List[str] = []
    for pattern in patterns:
        for expanded in expand_braces(pattern):
            paths.extend(sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded])
    if not paths:
        raise ValueError(f"no webdataset shards match {shards!r}")
    return paths


def _split_member_name(name: str) -> Tuple[str, str]:
    directory, base = os.path.split(name)
    key, _, extension = base.partition(".")
    return os.path.join(directory, key), extension.lower()


def iter_tar_samples(path: str) -> Iterator[Tuple[str, Dict[str, bytes]]]:
    """Yield ``(key, {extension: bytes})`` for consecutive members of a tar shard, streaming."""
    current_key, current = None, {}
    with tarfile.open(path, mode="r|*") as archive:
        for member in archive:
            if not member.isfile():
                continue
            key, extension = _split_member_name(member.name)
            if current_key is not None and key != current_key:
                yield current_key, current
                current = {}
            current_key = key
            current[extension] = archive.extractfile(member).read()
    if current_key is not None:
        yield current_key, current


class WebDatasetImageText(IterableDataset, BadSampleLog):
    """Iterable dataset over tar shards yielding the same sample dicts as ``ImageTextDataset``.

    Shards are split over ``world_size`` ranks (pass ``rank``/``world_size`` only when each process
    must read its own part) and over data-loader workers. A bad sample yields ``None`` (counted); an
    unreadable shard is logged and skipped. ``set_epoch`` changes the shard order when ``shuffle_shards``.
    """

    def __init__(
        self,
        shards: Union[str, Sequence[str]],
        transform: Callable,
        text_tokenizer: ClipTextTokenizer,
        shard_stride: int = 1_000_000,
        rank: int = 0,
        world_size: int = 1,
        shuffle_shards: bool = False,
        seed: int = 0,
    ):
        BadSampleLog.__init__(self)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.shards = expand_shards(shards)
        self.transform, self.text_tokenizer = transform, text_tokenizer
        self.shard_stride, self.rank, self.world_size = shard_stride, rank, world_size
        self.shuffle_shards, self.seed, self.epoch = shuffle_shards, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch used to shuffle the shard order."""
        self.epoch = epoch

    def split_index(self, index: int) -> Tuple[str, int]:
        """The shard path and the position inside it of a sample index."""
        return self.shards[index // self.shard_stride], index % self.shard_stride

    def _my_shards(self) -> List[int]:
        order = list(range(len(self.shards)))
        if self.shuffle_shards:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(order), generator=generator).tolist()
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return order[self.rank * workers + worker :: self.world_size * workers]

    def _decode(self, index: int, key: str, parts: Dict[str, bytes], shard: str) -> Optional[Sample]:
        source = f"{shard}: {key}"
        caption_key = next((k for k in CAPTION_KEYS if k in parts), None)
        image_key = next((k for k in IMAGE_KEYS if k in parts), None)
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

    def __iter__(self) -> Iterator[Optional[Sample]]:
        for shard_number in self._my_shards():
            shard = self.shards[shard_number]
            try:
                for position, (key, parts) in enumerate(iter_tar_samples(shard)):
                    if position >= self.shard_stride:
                        raise ValueError(f"{shard}: more than shard_stride={self.shard_stride} samples")
                    yield self._decode(shard_number * self.shard_stride + position, key, parts, shard)
            except (OSError, tarfile.TarError) as error:
                self.mark_bad(shard_number * self.shard_stride, shard, f"unreadable shard (rest skipped): {error}")
