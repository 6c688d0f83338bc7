"""k-means of image and text features into the 3x3 pseudo-label clusters of one DMU stage.

The project's own k-means (the default, ``auto`` or ``torch``) runs over features streamed a chunk at a time and
over every rank of the process group, in memory that does not grow with the number of samples beyond the labels:

1. a seeding sample of at most ``sample_size`` samples is drawn by sample index (the same on every rank and for
   any number of ranks; all samples when there are no more) and gathered on every rank;
2. ``restarts`` fits on the sample, each k-means++ (draws by the exponential-race form of a categorical draw:
   no size limit) then Lloyd's iterations until no label changes; the fit of least inertia is kept, a later fit
   replacing the one kept so far only when its inertia is lower by more than a relative ``1e-5`` (so that
   rounding never picks a relabelled copy of the same partition); every rank fits the same sample and uses the
   main process's result; non-finite features are refused;
3. when the sample is not the whole set, Lloyd passes over all features: every rank assigns its own chunks
   and sums them per cluster, the sums and counts are all-reduced (float64), until at most ``tolerance`` x N
   labels change in a pass (``0``: until none changes) or ``max_iter`` centroid updates.

Everything is a function of the seed and the features: the labels are the same for 1 or several processes,
any number of threads, and whatever optional package is installed. ``faiss`` and ``sklearn`` (on request)
train on the same gathered sample (faiss' ``max_points_per_centroid`` is raised to keep all of it); every
sample is then assigned to its nearest centroid by the same streamed pass.
"""

import logging
import math
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Tuple, Union

import numpy as np
import torch

from mllm_encoder.atomic import atomic_write_json
from mllm_encoder.distributed import DistState, gather_sizes
from mllm_encoder.dmu.config import KMEANS_BACKENDS, DMUSection
from mllm_encoder.dmu.features import CHUNK_ROWS, normalise

logger = logging.getLogger(__name__)

SAMPLE_SIZE = DMUSection.kmeans_sample_size  # samples the seeding (and faiss / sklearn training) uses
RESTARTS = DMUSection.kmeans_restarts  # fits on the sample: each one in-memory fit of the sample, whatever N
TOLERANCE = DMUSection.kmeans_tolerance  # the streamed passes stop when at most this fraction of labels changed
MAX_ITER = 50
_SAME_INERTIA = 1e-5  # relative inertia differences below this are rounding, not a better partition

# A re-iterable source of (sample indices, rows) chunks: this rank's share of one modality's features.
Chunks = Callable[[], Iterable[Tuple[np.ndarray, torch.Tensor]]]


def seed_sample_indices(num_candidates: int, sample_size: int, seed: int) -> Optional[np.ndarray]:
    """Sorted sample indices of the seeding sample drawn from ``range(num_candidates)``; ``None`` means all.

    Memory and time grow with ``sample_size`` only (NumPy's set-based draw without replacement), so any number
    of candidates works.
    """
    if num_candidates <= sample_size:
        return None
    return np.sort(np.random.default_rng([seed, num_candidates]).choice(num_candidates, sample_size, replace=False))


def _sum_over_ranks(tensor: torch.Tensor, state: DistState) -> torch.Tensor:
    if state.world_size > 1:
        state.sum_reduce(tensor)
    return tensor


def _main_process_copy(tensor: torch.Tensor, state: DistState) -> torch.Tensor:
    """The main process's ``tensor`` on every rank (a broadcast as a sum with zeros: exact)."""
    if state.world_size > 1:
        if not state.is_main:
            tensor = torch.zeros_like(tensor)
        state.sum_reduce(tensor)
    return tensor


def _gather_rows(index: np.ndarray, rows: torch.Tensor, state: DistState, device) -> Tuple[np.ndarray, torch.Tensor]:
    """Every rank's (index, rows), concatenated on every rank and sorted by index, as float32 on ``device``."""
    if state.world_size > 1:
        sizes = gather_sizes(len(index), state, device)
        width = max(gather_sizes(rows.shape[1] if len(index) else 0, state, device))
        padded_index = torch.zeros(max(sizes), dtype=torch.int64, device=device)
        padded_index[: len(index)] = torch.from_numpy(index).to(device)
        padded = torch.zeros(max(sizes), width, dtype=torch.float32, device=device)
        if len(index):  # a rank may hold no row (more ranks than feature files, or none of the sample)
            padded[: len(index)] = rows.to(device, torch.float32)
        gathered = []
        for tensor in (padded_index, padded):
            chunks = [torch.empty_like(tensor) for _ in range(state.world_size)]
            state.gather_into(chunks, tensor)
            gathered.append(torch.cat([chunk[:size] for chunk, size in zip(chunks, sizes)]))
            del chunks
        index, rows = gathered[0].cpu().numpy(), gathered[1]
    order = np.argsort(index, kind="stable")
    return index[order], rows[torch.from_numpy(order).to(rows.device)].to(device, torch.float32)


def gather_labels(
    index: np.ndarray, labels: np.ndarray, state: DistState, device: Union[str, torch.device] = "cpu"
) -> Tuple[np.ndarray, np.ndarray]:
    """Every rank's (sample index, label) pairs on every rank, sorted by sample index."""
    if state.world_size == 1:
        order = np.argsort(index, kind="stable")
        return index[order], labels[order]
    pairs = torch.from_numpy(np.stack([index, labels], axis=1).astype(np.int64)).to(device)
    sizes = gather_sizes(len(pairs), state, device)
    padded = torch.zeros(max(sizes), 2, dtype=torch.int64, device=device)
    padded[: len(pairs)] = pairs
    chunks = [torch.empty_like(padded) for _ in range(state.world_size)]
    state.gather_into(chunks, padded)
    merged = torch.cat([chunk[:size] for chunk, size in zip(chunks, sizes)]).cpu().numpy()
    order = np.argsort(merged[:, 0], kind="stable")
    return merged[order, 0], merged[order, 1]


def _gather_sample(
    chunks: Chunks, num_candidates: int, sample_size: int, seed: int, state: DistState, device
) -> Tuple[np.ndarray, torch.Tensor]:
    """The seeding sample (indices and float32 rows, sorted by index), the same on every rank."""
    chosen = seed_sample_indices(num_candidates, sample_size, seed)
    indices, rows = [], []
    for index, values in chunks():
        keep = np.ones(len(index), dtype=bool) if chosen is None else np.isin(index, chosen, assume_unique=True)
        if keep.any():
            indices.append(index[keep])
            rows.append(values[torch.from_numpy(keep)])  # as stored (float16): half the memory
    index = np.concatenate(indices) if indices else np.zeros(0, dtype=np.int64)
    values = torch.cat(rows) if rows else torch.zeros(0, 0)
    del rows
    return _gather_rows(index, values, state, device)


def _kmeans_plus_plus(data: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ centres from ``data``: the first uniformly, each next with probability ~ squared distance to
    the nearest centre so far (drawn as ``argmax(p / E)`` with ``E`` exponential noise, which is what
    ``torch.multinomial`` draws for one sample, without its 2^24 limit)."""
    centroids = data[torch.randint(len(data), (1,), generator=generator).to(data.device)]
    for _ in range(1, k):
        nearest = torch.cdist(data, centroids).min(dim=1).values.pow(2).double().cpu()
        total = nearest.sum()
        pick = 0
        if total > 0:
            noise = torch.empty_like(nearest).exponential_(1, generator=generator)
            pick = int(torch.argmax(nearest / total / noise))
        centroids = torch.cat([centroids, data[pick].reshape(1, -1)])
    return centroids


def _assign(rows: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid of each row: ``argmax(x . c - |c|^2 / 2)``, i.e. the least squared distance."""
    half_norms = centroids.pow(2).sum(dim=1) / 2
    return (rows @ centroids.t() - half_norms).argmax(dim=1)


def _cluster_sums(rows: torch.Tensor, assign: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    one_hot = torch.nn.functional.one_hot(assign, k).to(rows.dtype)
    return (one_hot.t() @ rows).double(), torch.bincount(assign, minlength=k).double()


def _updated(sums: torch.Tensor, counts: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Cluster means (a cluster left empty keeps its centre)."""
    means = (sums / counts.clamp(min=1).unsqueeze(1)).to(centroids.dtype)
    return torch.where(counts.unsqueeze(1) > 0, means, centroids)


def _lloyd_in_memory(data: torch.Tensor, centroids: torch.Tensor, k: int, max_iter: int) -> torch.Tensor:
    for _ in range(max_iter):
        updated = _updated(*_cluster_sums(data, _assign(data, centroids), k), centroids)
        if torch.equal(updated, centroids):
            break
        centroids = updated
    return centroids


def _inertia(data: torch.Tensor, centroids: torch.Tensor) -> float:
    """Sum of the squared distances of ``data``'s rows to their nearest centroid."""
    return float(torch.cdist(data, centroids).min(dim=1).values.double().pow(2).sum())


def _fit_sample(sample: torch.Tensor, k: int, seed: int, restarts: int, max_iter: int) -> torch.Tensor:
    """Centroids of the best of ``restarts`` k-means++ + Lloyd fits on the in-memory sample."""
    generator = torch.Generator().manual_seed(seed)
    best, best_inertia = None, math.inf
    for restart in range(restarts):
        centroids = _lloyd_in_memory(sample, _kmeans_plus_plus(sample, k, generator), k, max_iter)
        inertia = _inertia(sample, centroids)
        logger.debug("k-means restart %d: inertia %.6g on the sample", restart, inertia)
        if best is None or inertia < best_inertia * (1 - _SAME_INERTIA):
            best, best_inertia = centroids, inertia
    assert best is not None  # restarts >= 1
    return best


def _non_finite_error(rows: int) -> ValueError:
    return ValueError(
        f"{rows} feature rows are not finite (NaN or inf): the model's features overflowed (try "
        "runtime.mixed_precision: 'no' or bf16) or its weights are broken"
    )


def _lloyd_streamed(
    chunks: Chunks, centroids: torch.Tensor, k: int, max_iter: int, tolerance: float, state: DistState, device
) -> np.ndarray:
    """Lloyd passes over every rank's chunks until at most ``tolerance`` of all labels change in a pass (or
    ``max_iter`` updates); returns this rank's labels. Non-finite rows are counted on the first pass and refused
    on every rank together."""
    labels: Optional[np.ndarray] = None
    for iteration in range(max_iter + 1):
        sums = torch.zeros_like(centroids, dtype=torch.float64)
        counts = torch.zeros(k, dtype=torch.float64, device=device)
        parts, non_finite = [], 0
        for _, values in chunks():
            rows = values.to(device, torch.float32)
            if labels is None:
                non_finite += int((~torch.isfinite(rows).all(dim=1)).sum())
            assign = _assign(rows, centroids)
            chunk_sums, chunk_counts = _cluster_sums(rows, assign, k)
            sums += chunk_sums
            counts += chunk_counts
            parts.append(assign.cpu().numpy().astype(np.int64))
        current = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        changed = len(current) if labels is None else int((current != labels).sum())
        changed, total, non_finite = _sum_over_ranks(
            torch.tensor([changed, len(current), non_finite], dtype=torch.float64, device=device), state
        ).tolist()
        if non_finite:
            raise _non_finite_error(int(non_finite))
        labels = current
        logger.debug("k-means pass %d: %d of %d labels changed", iteration, changed, total)
        if iteration == max_iter or changed <= tolerance * total:
            break
        _sum_over_ranks(sums, state)
        _sum_over_ranks(counts, state)
        centroids = _updated(sums, counts, centroids)
    return labels


def _library_centroids(
    backend: str, sample: torch.Tensor, k: int, seed: int, restarts: int, max_iter: int
) -> torch.Tensor:
    data = sample.cpu().numpy().astype(np.float32)
    if backend == "sklearn":
        from sklearn.cluster import MiniBatchKMeans

        model = MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=min(len(data), 4096), n_init=restarts)
        centres = model.fit(data).cluster_centers_
    else:
        import faiss

        kmeans = faiss.Kmeans(
            data.shape[1], k, niter=max_iter, nredo=restarts, seed=seed, max_points_per_centroid=-(-len(data) // k)
        )
        kmeans.train(data)
        centres = kmeans.centroids
    return torch.from_numpy(np.asarray(centres, dtype=np.float32)).to(sample.device)


def kmeans_chunks(
    chunks: Chunks,
    k: int,
    num_candidates: int,
    seed: int = 0,
    backend: str = "auto",
    state: Optional[DistState] = None,
    device: Union[str, torch.device] = "cpu",
    sample_size: int = SAMPLE_SIZE,
    restarts: int = RESTARTS,
    tolerance: float = TOLERANCE,
    max_iter: int = MAX_ITER,
) -> np.ndarray:
    """Cluster the normalised rows that ``chunks()`` yields on every rank into ``k`` groups.

    ``num_candidates`` bounds the sample indices (the dataset's length); returns int64 labels of this rank's rows
    in the order ``chunks()`` yields them. Every rank of ``state`` must call this together. ``restarts`` fits
    on the sample keep the one of least inertia (faiss' ``nredo``, scikit-learn's ``n_init``); the streamed
    passes stop when at most ``tolerance`` x N labels changed in one.
    """
    if backend not in KMEANS_BACKENDS:
        raise ValueError(f"unknown k-means backend {backend!r}; expected one of {KMEANS_BACKENDS}")
    if restarts < 1 or not 0 <= tolerance < 1:
        raise ValueError(f"k-means needs restarts >= 1 and a tolerance in [0, 1); got {restarts} and {tolerance}")
    state = state or DistState()
    index, sample = _gather_sample(chunks, num_candidates, sample_size, seed, state, device)
    if len(sample) < k:
        raise ValueError(f"cannot make {k} clusters from {len(sample)} samples")
    if not torch.isfinite(sample).all():  # the same gathered sample on every rank: all refuse together
        raise _non_finite_error(int((~torch.isfinite(sample).all(dim=1)).sum()))
    logger.info("k-means (%s): %d samples seed %d clusters of dim %d", backend, len(sample), k, sample.shape[1])
    if backend in ("sklearn", "faiss"):
        centroids = _main_process_copy(_library_centroids(backend, sample, k, seed, restarts, max_iter), state)
        return _lloyd_streamed(chunks, centroids, k, 0, tolerance, state, device)
    # every rank fits the same sample; the main process's fit is used everywhere, so that machines whose float
    # rounding differs (mixed hardware) never disagree on which restart won
    centroids = _main_process_copy(_fit_sample(sample, k, seed, restarts, max_iter), state)
    if seed_sample_indices(num_candidates, sample_size, seed) is None:  # the sample is the whole set
        sample_labels = _assign(sample, centroids).cpu().numpy().astype(np.int64)
        return np.concatenate([sample_labels[np.searchsorted(index, part)] for part, _ in chunks()] or [[]])
    return _lloyd_streamed(chunks, centroids, k, max_iter, tolerance, state, device)


def _array_chunks(features: np.ndarray, chunk_rows: int) -> Chunks:
    def chunks():
        for start in range(0, len(features), chunk_rows):
            rows = torch.from_numpy(np.asarray(features[start : start + chunk_rows], dtype=np.float32))
            yield np.arange(start, start + len(rows)), normalise(rows)

    return chunks


def kmeans(
    features: np.ndarray,
    k: int,
    seed: int = 0,
    backend: str = "auto",
    sample_size: int = SAMPLE_SIZE,
    chunk_rows: int = CHUNK_ROWS,
    restarts: int = RESTARTS,
    tolerance: float = TOLERANCE,
) -> np.ndarray:
    """Cluster ``features`` [N, D] (L2-normalised, then rounded to float16 as stored) into ``k`` groups in one
    process, ``chunk_rows`` at a time; returns int64 labels [N]. See :func:`kmeans_chunks`."""
    if len(features) < k:
        raise ValueError(f"cannot make {k} clusters from {len(features)} samples")
    chunks = _array_chunks(features, chunk_rows)
    return kmeans_chunks(
        chunks, k, len(features), seed, backend, sample_size=sample_size, restarts=restarts, tolerance=tolerance
    )


def stage_labels(
    image_features: np.ndarray,
    text_features: np.ndarray,
    k_image: int = 3,
    k_text: int = 3,
    seed: int = 0,
    backend: str = "auto",
) -> np.ndarray:
    """One stage's label ``text_cluster * k_image + image_cluster`` (k_image * k_text values)."""
    image = kmeans(image_features, k_image, seed=seed, backend=backend)
    text = kmeans(text_features, k_text, seed=seed + 1, backend=backend)
    return text * k_image + image


def accumulate_labels(previous: np.ndarray, current: np.ndarray, clusters_per_stage: int = 9) -> np.ndarray:
    """``previous * clusters_per_stage + current``, relabelled to dense ids 0..M-1 (M occupied clusters)."""
    previous, current = np.asarray(previous, dtype=np.int64), np.asarray(current, dtype=np.int64)
    if previous.shape != current.shape:
        raise ValueError(f"label arrays differ in length: {previous.shape} vs {current.shape}")
    combined = previous * clusters_per_stage + current
    return np.unique(combined, return_inverse=True)[1].reshape(-1).astype(np.int64)


def cluster_sizes(labels: np.ndarray) -> Dict[int, int]:
    """Number of samples per cluster id."""
    ids, counts = np.unique(labels, return_counts=True)
    return {int(i): int(c) for i, c in zip(ids, counts)}


def save_cluster_report(labels: np.ndarray, out_dir: Union[str, Path], title: str = "cluster sizes") -> Path:
    """Write ``cluster_sizes.json`` and a bar plot ``cluster_sizes.png``; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = cluster_sizes(labels)
    atomic_write_json(out_dir / "cluster_sizes.json", sizes, indent=1)
    fig, ax = plt.subplots(figsize=(max(4, 0.3 * len(sizes)), 3))
    ax.bar([str(i) for i in sizes], list(sizes.values()), color="tab:blue")
    ax.set_xlabel("cluster")
    ax.set_ylabel("samples")
    ax.set_title(title)
    fig.tight_layout()
    png = out_dir / "cluster_sizes.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
