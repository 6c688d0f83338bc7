"""The streamed, distributed k-means and the float16 feature parts: chunking, ranks, threads, installed packages,
old float32 run directories and more than 2^24 candidates change nothing."""

import logging
import os
import sys
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dmu_helpers import TensorPairs, collate
from process_helpers import free_port
from safetensors.numpy import load_file, save_file

from mllm_encoder.cli import main
from mllm_encoder.distributed import DistState
from mllm_encoder.dmu.clustering import kmeans, kmeans_chunks, seed_sample_indices
from mllm_encoder.dmu.config import DMUSection
from mllm_encoder.dmu.features import extract_features, feature_files, load_features, normalise
from mllm_encoder.dmu.stages import run_cluster


def _directions(n, dim=16, k=3, seed=0, spread=0.6):
    """``n`` points around ``k`` random directions (overlapping enough for Lloyd to take several passes)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, dim))
    truth = rng.integers(0, k, n)
    return (centres[truth] + spread * rng.standard_normal((n, dim))).astype(np.float32), truth


def _same_partition(a, b):
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


class _Embedder(torch.nn.Module):
    def get_image_features(self, pixel_values):
        return pixel_values.flatten(1)[:, :6]

    def get_text_features(self, input_ids, attention_mask=None):
        return input_ids[:, :5].float()


def test_chunked_extraction_equals_one_part_and_clusters_the_same(tmp_path):
    pairs = TensorPairs(n=40)
    parts = extract_features(_Embedder(), pairs, collate, tmp_path / "parts", batch_size=4, chunk_rows=7)
    extract_features(_Embedder(), pairs, collate, tmp_path / "whole", batch_size=4, chunk_rows=1000)
    assert [path.name for path in parts][:2] == [
        "features_rank0.part00000.safetensors",
        "features_rank0.part00001.safetensors",
    ]
    assert len(parts) == 6  # 40 rows in parts of 7, the last 5
    chunked, whole = load_features(tmp_path / "parts"), load_features(tmp_path / "whole")
    for key in ("index", "image", "text"):
        np.testing.assert_array_equal(chunked[key], whole[key])
    labels = [np.load(run_cluster(tmp_path / name, 40, tmp_path / f"c_{name}")) for name in ("parts", "whole")]
    np.testing.assert_array_equal(*labels)
    in_memory = kmeans(whole["image"].astype(np.float32), 3, seed=0)  # the stage's image clusters, from memory
    np.testing.assert_array_equal(labels[0] % 3, in_memory)


def test_an_old_float32_run_directory_clusters_as_its_float16_copy(tmp_path):
    """Run directories from before the float16 parts (one unnormalised float32 shard per rank) still work."""
    image, _ = _directions(50, seed=1)
    text, _ = _directions(50, seed=2)
    index = np.arange(50)
    old = tmp_path / "old"
    old.mkdir()
    for rank in range(2):
        mine = index[rank::2]
        arrays = {"index": mine.astype(np.int64), "image": image[mine] * 7.0, "text": text[mine] * 0.1}
        save_file(arrays, str(old / f"features_rank{rank}.safetensors"))
    features = load_features(old)
    assert features["image"].dtype == np.float16
    np.testing.assert_array_equal(features["image"], normalise(torch.from_numpy(image)).numpy())
    labels = np.load(run_cluster(old, 50, tmp_path / "clusters", seed=3))
    expected = kmeans(text, 3, seed=4) * 3 + kmeans(image, 3, seed=3)
    np.testing.assert_array_equal(labels, expected)


@pytest.mark.parametrize("chunk_rows", [5, 64, 10_000])
def test_streamed_lloyd_passes_do_not_depend_on_the_chunking(chunk_rows):
    points, truth = _directions(600, seed=5, spread=0.3)
    chunked = kmeans(points, 3, seed=0, sample_size=100, chunk_rows=chunk_rows)
    assert _same_partition(chunked, truth)
    np.testing.assert_array_equal(chunked, kmeans(points, 3, seed=0, sample_size=100, chunk_rows=7))


def _inertia(points, labels):
    rows = normalise(torch.from_numpy(points)).numpy().astype(np.float64)
    return sum(((rows[labels == c] - rows[labels == c].mean(0)) ** 2).sum() for c in np.unique(labels))


def test_restarts_keep_the_fit_of_least_inertia():
    """On these points k-means++ seed 3's first fit stops in a local optimum (one true cluster split, two merged);
    a later restart finds the true partition, whose inertia is lower, and that one is kept."""
    points, truth = _directions(1500, dim=64, seed=3, spread=1.0)
    first = kmeans(points, 3, seed=3, restarts=1)
    best = kmeans(points, 3, seed=3, restarts=4)
    assert not _same_partition(first, truth) and _same_partition(best, truth)
    assert _inertia(points, best) < 0.99 * _inertia(points, first)
    np.testing.assert_array_equal(kmeans(points, 3, seed=3), best)  # the default restarts


def test_streamed_passes_stop_at_the_tolerance(caplog):
    """Seeded on 30 of 3000 overlapping samples, the passes over all of them run until no label changes with
    tolerance 0; a tolerance stops them at the first pass that changed at most that fraction of the labels."""
    points, _ = _directions(3000, seed=6, spread=1.5)

    def passes(tolerance):
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="mllm_encoder.dmu.clustering"):
            labels = kmeans(points, 3, seed=2, sample_size=30, restarts=1, tolerance=tolerance)
        changed = [int(r.getMessage().split()[3]) for r in caplog.records if r.getMessage().startswith("k-means pass")]
        return labels, changed

    exact, changed = passes(0.0)
    assert changed[0] == 3000 and changed[-1] == 0 and len(changed) > 3 and min(changed[:-1]) > 0
    tolerance = 0.5 * (changed[1] + changed[2]) / 3000  # between the second and third pass's changes
    stopped, early = passes(tolerance)
    assert early == changed[: len(early)] and early[-1] <= tolerance * 3000 < early[-2]
    assert (stopped != exact).sum() > 0


def test_the_cluster_command_passes_its_kmeans_flags(tmp_path, capsys, monkeypatch):
    from mllm_encoder.dmu import stages

    extract_features(_Embedder(), TensorPairs(n=120, seed=4), collate, tmp_path / "features", chunk_rows=32)
    calls = []

    def recording(*args):
        calls.append(args[3:])  # seed, backend, state, device, sample_size, restarts, tolerance
        return kmeans_chunks(*args)

    monkeypatch.setattr(stages, "kmeans_chunks", recording)
    flags = ["--sample-size", "40", "--restarts", "2", "--tolerance", "0.05", "--seed", "5", "--backend", "torch"]
    main(["dmu", "cluster", "--features", str(tmp_path / "features"), "--out", str(tmp_path / "cli"), *flags])
    assert str(tmp_path / "cli" / "labels.npy") in capsys.readouterr().out
    assert [(call[0], call[1], *call[4:]) for call in calls] == [(5, "torch", 40, 2, 0.05), (6, "torch", 40, 2, 0.05)]
    clustering = DMUSection(kmeans_backend="torch", kmeans_sample_size=40, kmeans_restarts=2, kmeans_tolerance=0.05)
    library = np.load(run_cluster(tmp_path / "features", 120, tmp_path / "library", clustering=clustering, seed=5))
    np.testing.assert_array_equal(np.load(tmp_path / "cli" / "labels.npy"), library)


def _outside_the_sample(num_samples: int, sample_size: int, seed: int) -> int:
    sample = seed_sample_indices(num_samples, sample_size, seed)
    return 0 if sample is None else int(np.setdiff1d(np.arange(num_samples), sample)[0])


@pytest.mark.parametrize("sample_size", [100_000, 50])  # the row in the in-memory sample, or only in the passes
def test_non_finite_features_are_refused_by_name(tmp_path, sample_size):
    points, _ = _directions(300, seed=8)
    points[_outside_the_sample(300, sample_size, seed=0)] = np.nan
    with pytest.raises(ValueError, match="^1 feature rows are not finite"):
        kmeans(points, 3, seed=0, sample_size=sample_size)
    extract_features(_Embedder(), TensorPairs(n=60, seed=4), collate, tmp_path / "features")
    path = feature_files(tmp_path / "features")[0]
    arrays = load_file(str(path))
    arrays["text"][_outside_the_sample(60, sample_size, seed=1)] = np.inf  # the text k-means uses seed + 1
    save_file(arrays, str(path))
    clustering = DMUSection(kmeans_sample_size=sample_size)
    with pytest.raises(ValueError, match=f"^{tmp_path / 'features'}: text features: 1 feature rows are not finite"):
        run_cluster(tmp_path / "features", 60, tmp_path / "clusters", clustering=clustering)


def test_kmeans_refuses_restarts_and_tolerance_out_of_range():
    points, _ = _directions(30)
    with pytest.raises(ValueError, match="restarts >= 1"):
        kmeans(points, 3, restarts=0)
    with pytest.raises(ValueError, match=r"tolerance in \[0, 1\)"):
        kmeans(points, 3, tolerance=1.0)


def test_labels_do_not_depend_on_threads_or_on_faiss(monkeypatch):
    points, _ = _directions(3000, seed=6)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kmeans(points, 3, seed=2, sample_size=500)
        torch.set_num_threads(2)
        two = kmeans(points, 3, seed=2, sample_size=500)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(one, two)
    broken = types.ModuleType("faiss")  # the default never imports faiss: an installed one cannot change a label
    monkeypatch.setitem(sys.modules, "faiss", broken)
    np.testing.assert_array_equal(kmeans(points, 3, seed=2, sample_size=500), one)
    np.testing.assert_array_equal(kmeans(points, 3, seed=2, sample_size=500, backend="torch"), one)


def test_sklearn_trains_on_the_stated_sample_then_assigns_every_sample():
    points, truth = _directions(800, seed=7, spread=0.2)
    labels = kmeans(points, 3, seed=0, backend="sklearn", sample_size=200)
    assert labels.shape == (800,) and _same_partition(labels, truth)


def test_seeding_draws_from_more_than_2_to_the_24_candidates_cheaply(monkeypatch):
    """A shard whose sample indices run past 2^24, rows made on the fly from the index: the seeding sample is
    drawn by index without listing the candidates, and no draw goes through ``torch.multinomial``."""
    num_candidates, stride = 2**24 + 4096, 4096
    index = np.arange(0, num_candidates, stride)  # 4097 rows held by this rank
    centres = torch.eye(3, 8)

    def rows_of(part):
        generator = torch.Generator().manual_seed(int(part[0]))
        noisy = centres[torch.from_numpy(part % 3)] + 0.05 * torch.randn(len(part), 8, generator=generator)
        return normalise(noisy)

    def chunks():
        return (
            (index[start : start + 1000], rows_of(index[start : start + 1000])) for start in range(0, len(index), 1000)
        )

    def refuse(*args, **kwargs):
        raise AssertionError("torch.multinomial called")

    monkeypatch.setattr(torch, "multinomial", refuse)
    sample = seed_sample_indices(num_candidates, 2**20, seed=0)
    assert len(sample) == 2**20 and sample[-1] < num_candidates and np.all(np.diff(sample) > 0)
    labels = kmeans_chunks(chunks, 3, num_candidates, seed=0, sample_size=2**20)
    assert _same_partition(labels, index % 3)


def _cluster_worker(rank: int, world_size: int, port: int, run: str, features: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    previous = f"{run}/previous.npy"
    for sample_size in (10_000, 60):  # seeded on all samples, then on 60 of them with streamed passes
        out = f"{run}/clusters_{features}_{world_size}_{sample_size}"
        clustering, state = DMUSection(kmeans_sample_size=sample_size), DistState.from_torch()
        run_cluster(f"{run}/{features}", 200, out, previous, clustering, seed=1, state=state)
        dist.barrier()
        if rank == 0:
            queue.put(np.load(f"{out}/labels.npy"))
    dist.destroy_process_group()


def _labels_on(world_size: int, run: str, features: str):
    queue = mp.get_context("spawn").Queue()
    args = (world_size, free_port(), run, features, queue)
    context = mp.start_processes(_cluster_worker, args=args, nprocs=world_size, join=False, start_method="spawn")
    labels = [queue.get(timeout=120) for _ in range(2)]
    context.join()
    return labels


@pytest.mark.slow
@pytest.mark.multiprocess
def test_one_and_two_gloo_processes_give_identical_labels(tmp_path):
    """Three extraction ranks (the clustering ranks split their 15 files unevenly), and one extraction part (the
    second clustering rank holds no row)."""
    pairs = TensorPairs(n=200, seed=3)
    for rank in range(3):
        extract_features(_Embedder(), pairs, collate, tmp_path / "features", DistState(3, rank), chunk_rows=16)
    extract_features(_Embedder(), pairs, collate, tmp_path / "one_part", chunk_rows=1000)
    previous = np.zeros(200, dtype=np.int64)
    previous[100:] = 4
    np.save(tmp_path / "previous.npy", previous)
    assert len(feature_files(tmp_path / "features")) == 15 and len(feature_files(tmp_path / "one_part")) == 1
    for features in ("features", "one_part"):
        one, two = _labels_on(1, str(tmp_path), features), _labels_on(2, str(tmp_path), features)
        for single, double in zip(one, two):
            np.testing.assert_array_equal(single, double)
            assert (single >= 0).all() and len(np.unique(single)) > 9  # previous labels 0 and 4 refined by 3x3
