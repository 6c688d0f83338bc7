"""Image and text feature extraction, written by every rank in float16 parts as it goes, and read back a chunk
at a time.

An extraction directory holds ``features_rank{r}.part{i:05d}.safetensors`` files: each holds up to
:data:`CHUNK_ROWS` samples of rank ``r`` as ``index`` (the samples' stable indices, int64), ``image`` and
``text`` (the projected embeddings, L2-normalised, float16). Run directories made before this layout hold one
``features_rank{r}.safetensors`` per rank with unnormalised float32 embeddings; the readers accept both and
give the same thing for either (normalised rows rounded to float16), so such runs resume unchanged.
"""

import logging
import re
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save
from tqdm.auto import tqdm

from mllm_encoder.atomic import atomic_write_bytes
from mllm_encoder.distributed import DistState
from mllm_encoder.encode import embed_images, embed_texts

logger = logging.getLogger(__name__)

CHUNK_ROWS = 16384  # samples per part file and per chunk read: 48 MiB of float16 at dim 768, both modalities
FEATURE_DTYPE = torch.float16
MODALITIES = ("image", "text")
_FILE_NAME = re.compile(r"^features_rank(\d+)(?:\.part(\d+))?\.safetensors$")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def normalise(features: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (computed in float32), rounded to the stored :data:`FEATURE_DTYPE`."""
    features = features.float()
    norms = torch.linalg.vector_norm(features, dim=1, keepdim=True).clamp(min=1e-12)
    return (features / norms).to(FEATURE_DTYPE)


class _PartWriter:
    """Buffers one rank's rows and writes a part file every ``chunk_rows`` rows (atomically)."""

    def __init__(self, out_dir: Path, rank: int, chunk_rows: int) -> None:
        self.out_dir, self.rank, self.chunk_rows = out_dir, rank, chunk_rows
        self.parts: Dict[str, List[torch.Tensor]] = {"index": [], "image": [], "text": []}
        self.buffered = self.written = self.part = 0
        self.paths: List[Path] = []

    def add(self, index: torch.Tensor, image: torch.Tensor, text: torch.Tensor) -> None:
        for key, value in (("index", index.to(torch.int64)), ("image", image), ("text", text)):
            self.parts[key].append(value.cpu())
        self.buffered += len(index)
        while self.buffered >= self.chunk_rows:
            self.flush()

    def flush(self, final: bool = False) -> None:
        """Write the first ``chunk_rows`` buffered rows as the next part (at the end: the rest, or an empty part
        for a rank without any good sample, which still marks its share as extracted)."""
        if self.buffered == 0 and not (final and self.part == 0):
            return
        if self.buffered == 0:
            arrays = {"index": torch.zeros(0, dtype=torch.int64)}
            arrays.update({key: torch.zeros((0, 0), dtype=FEATURE_DTYPE) for key in MODALITIES})
        else:
            arrays = {key: torch.cat(value) for key, value in self.parts.items()}
        rows = min(self.buffered, self.chunk_rows)
        self.parts = {key: [value[rows:].clone()] for key, value in arrays.items()}
        path = self.out_dir / f"features_rank{self.rank}.part{self.part:05d}.safetensors"
        atomic_write_bytes(path, save({key: value[:rows].contiguous() for key, value in arrays.items()}))
        self.paths.append(path)
        self.written += rows
        self.buffered, self.part = self.buffered - rows, self.part + 1


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    dataset: torch.utils.data.Dataset,
    collate_fn: Callable,
    out_dir: Union[str, Path],
    state: Optional[DistState] = None,
    batch_size: int = 256,
    num_workers: int = 0,
    chunk_rows: int = CHUNK_ROWS,
) -> List[Path]:
    """Embed this rank's share (indices ``rank::world_size``) of ``dataset`` into part files of ``out_dir`` (with
    :mod:`mllm_encoder.encode`, on the model's device).

        Each part holds ``chunk_rows`` samples (the last fewer), so memory stays at one part whatever the size of
        the share; returns the part files written (at least one, possibly empty). Bad samples dropped by
        ``collate_fn`` are simply absent (a batch of only bad samples, ``None``, is skipped: the collator counts
        them and enforces its bad-sample limit).
    """
    if len(dataset) == 0:
        raise ValueError("the training set is empty: no sample to extract features from")
    state = state or DistState()
    out_dir = Path(out_dir)
    subset = torch.utils.data.Subset(dataset, range(state.rank, len(dataset), state.world_size))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, collate_fn=collate_fn, num_workers=num_workers)
    core = _unwrap(model).eval()
    writer = _PartWriter(out_dir, state.rank, chunk_rows)
    for batch in tqdm(loader, desc=f"extract features (rank {state.rank})", disable=not state.is_main):
        if batch is None:
            logger.warning("skipping a batch whose samples all failed to load")
            continue
        image = embed_images(core, batch["pixel_values"])
        text = embed_texts(core, batch["input_ids"], batch["attention_mask"])
        writer.add(batch["index"], normalise(image), normalise(text))
    while writer.buffered or not writer.paths:
        writer.flush(final=True)
    logger.info("wrote %d feature rows to %d part(s) in %s", writer.written, len(writer.paths), out_dir)
    return writer.paths


def feature_files(feature_dir: Union[str, Path]) -> List[Path]:
    """The feature files of an extraction (parts, or one float32 shard per rank of older runs), in (rank, part)
    order."""
    found = [
        (int(match[1]), int(match[2] or 0), path)
        for path in Path(feature_dir).glob("features_rank*.safetensors")
        if (match := _FILE_NAME.match(path.name))
    ]
    if not found:
        raise ValueError(f"no feature files (features_rank*.safetensors) in {feature_dir}")
    return [path for _, _, path in sorted(found)]


def _rows(path: Path) -> int:
    with safe_open(str(path), framework="pt") as handle:
        return handle.get_slice("index").get_shape()[0]


def iter_chunks(
    files: Sequence[Path], key: Optional[str] = None, chunk_rows: int = CHUNK_ROWS
) -> Iterator[Tuple[np.ndarray, Dict[str, torch.Tensor]]]:
    """``(index, {modality: rows})`` for at most ``chunk_rows`` samples at a time, file after file.

    ``key`` reads one modality only (default both). Rows are normalised float16 whatever the file's format;
    a file is opened for each chunk, so no more than one chunk of it is ever resident.
    """
    keys = MODALITIES if key is None else (key,)
    for path in files:
        for start in range(0, _rows(path), chunk_rows):
            with safe_open(str(path), framework="pt") as handle:
                stop = start + chunk_rows
                index = handle.get_slice("index")[start:stop].numpy()
                rows = {name: handle.get_slice(name)[start:stop] for name in keys}
            rows = {name: value if value.dtype == FEATURE_DTYPE else normalise(value) for name, value in rows.items()}
            yield index, rows


def feature_indices(files: Sequence[Path]) -> np.ndarray:
    """The sample indices held by ``files`` (in file order), read without the features."""
    parts = []
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            parts.append(handle.get_tensor("index").numpy())
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def load_features(feature_dir: Union[str, Path]) -> Dict[str, np.ndarray]:
    """Every feature of ``feature_dir`` in memory, sorted by sample index (normalised, float16): for small sets
    and tests; the cluster stage streams them with :func:`iter_chunks` instead."""
    files = feature_files(feature_dir)
    parts = [(index, rows) for index, rows in iter_chunks(files) if len(index)]
    if not parts:
        raise ValueError(
            f"{feature_dir}: the feature files hold no sample: every training sample was bad or the training set is "
            "empty (see the bad-sample warnings of the extraction)"
        )
    index = np.concatenate([part[0] for part in parts])
    order = np.argsort(index, kind="stable")
    arrays = {"index": index[order]}
    for name in MODALITIES:
        arrays[name] = torch.cat([part[1][name] for part in parts]).numpy()[order]
    return arrays
