"""k-means of image and text features into the 3x3 pseudo-label clusters of one DMU stage."""

import logging
from pathlib import Path
from typing import Dict, Union

import numpy as np
import torch

from mllm_encoder.atomic import atomic_write_json
from mllm_encoder.dmu.config import KMEANS_BACKENDS

logger = logging.getLogger(__name__)


def _normalise(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, dtype=np.float32)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def _kmeans_sklearn(features: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.cluster import MiniBatchKMeans

    batch = min(len(features), 4096)
    model = MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=batch, n_init=3)
    return model.fit_predict(features)


def _kmeans_torch(features: np.ndarray, k: int, seed: int, iters: int = 50) -> np.ndarray:
    """Lloyd's k-means from a k-means++ start, on the GPU when there is one; bit-reproducible for a seed on
    one machine (no atomics: sums by ``index_add_`` on CPU, a one-hot matmul on GPU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = torch.from_numpy(features).to(device)
    generator = torch.Generator().manual_seed(seed)
    centroids = data[torch.randint(len(data), (1,), generator=generator).to(device)]
    for _ in range(1, k):  # k-means++: next centre drawn with probability ~ squared distance to the nearest
        nearest = torch.cdist(data, centroids).min(dim=1).values.pow(2).double().cpu()
        pick = torch.multinomial(nearest / nearest.sum(), 1, generator=generator) if nearest.sum() > 0 else 0
        centroids = torch.cat([centroids, data[pick].reshape(1, -1)])
    for _ in range(iters):
        assign = torch.cdist(data, centroids).argmin(dim=1)
        one_hot = torch.nn.functional.one_hot(assign, k).to(data.dtype)
        sums = one_hot.t() @ data
        counts = one_hot.sum(0).unsqueeze(1)
        updated = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        if torch.equal(updated, centroids):
            break
        centroids = updated
    return torch.cdist(data, centroids).argmin(dim=1).cpu().numpy()


def _kmeans_faiss(features: np.ndarray, k: int, seed: int) -> np.ndarray:
    import faiss

    kmeans = faiss.Kmeans(features.shape[1], k, niter=50, seed=seed, gpu=torch.cuda.is_available())
    kmeans.train(features)
    return kmeans.index.search(features, 1)[1][:, 0]


def _pick_backend(backend: str) -> str:
    if backend not in KMEANS_BACKENDS:
        raise ValueError(f"unknown k-means backend {backend!r}; expected one of {KMEANS_BACKENDS}")
    if backend != "auto":
        return backend
    try:
        import faiss  # noqa: F401

        return "faiss"
    except ImportError:
        return "torch"


def kmeans(features: np.ndarray, k: int, seed: int = 0, backend: str = "auto") -> np.ndarray:
    """Cluster L2-normalised ``features`` [N, D] into ``k`` groups; returns int64 labels [N].

    ``auto`` uses faiss if installed, else the torch k-means (GPU or CPU, bit-reproducible for a seed);
    ``sklearn`` is scikit-learn's MiniBatchKMeans.
    """
    if len(features) < k:
        raise ValueError(f"cannot make {k} clusters from {len(features)} samples")
    backend = _pick_backend(backend)
    run = {"sklearn": _kmeans_sklearn, "torch": _kmeans_torch, "faiss": _kmeans_faiss}[backend]
    logger.info("k-means (%s): %d x %d features into %d clusters", backend, *features.shape, k)
    return np.asarray(run(_normalise(features), k, seed), dtype=np.int64)


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
