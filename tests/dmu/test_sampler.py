import numpy as np
import pytest

from mllm_encoder.dmu.sampler import ClusterBatchSampler


def _labels(seed=0, n=203, clusters=5):
    return np.random.default_rng(seed).integers(0, clusters, size=n)


def test_every_batch_from_one_cluster_without_repeats():
    labels = _labels()
    sampler = ClusterBatchSampler(labels, batch_size=8, seed=3)
    seen = []
    for batch in sampler:
        assert len({labels[i] for i in batch}) == 1
        assert 2 <= len(batch) <= 8
        seen.extend(batch)
    assert len(seen) == len(set(seen))
    # Without drop_last only clusters' singleton leftovers are lost.
    expected = sum(n if n % 8 != 1 else n - 1 for n in np.bincount(labels))
    assert len(seen) == expected


def test_drop_last_coverage_and_batch_count():
    labels = _labels()
    sampler = ClusterBatchSampler(labels, batch_size=8, seed=3, drop_last=True)
    batches = list(sampler)
    assert all(len(b) == 8 for b in batches)
    assert len(batches) == len(sampler) == sum(n // 8 for n in np.bincount(labels))


def test_two_ranks_share_the_cluster_at_every_step():
    labels = _labels(1)
    ranks = [list(ClusterBatchSampler(labels, batch_size=4, world_size=2, rank=r, seed=7, epoch=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) > 10
    union = []
    for batch0, batch1 in zip(*ranks):
        assert len(batch0) == len(batch1)
        assert len({labels[i] for i in batch0 + batch1}) == 1
        union.extend(batch0 + batch1)
    assert len(union) == len(set(union))
    assert len(union) >= len(labels) - 5 * 3  # at most world_size*2-1 leftovers per cluster


def test_deterministic_by_seed_and_epoch_and_resumable():
    labels = _labels()
    first = list(ClusterBatchSampler(labels, 8, seed=1, epoch=0))
    assert first == list(ClusterBatchSampler(labels, 8, seed=1, epoch=0))
    assert first != list(ClusterBatchSampler(labels, 8, seed=1, epoch=1))
    assert first != list(ClusterBatchSampler(labels, 8, seed=2, epoch=0))
    resumed = ClusterBatchSampler(labels, 8, seed=1, epoch=0, start_step=5)
    assert list(resumed) == first[5:] and len(resumed) == len(first) - 5


def test_single_cluster_is_a_random_batch_sampler():
    batches = list(ClusterBatchSampler(np.zeros(50, dtype=int), batch_size=16, seed=0))
    assert sorted(len(b) for b in batches) == [2, 16, 16, 16]
    assert sorted(i for b in batches for i in b) == list(range(50))
    assert batches[0] != sorted(batches[0])  # shuffled


def test_bad_arguments():
    with pytest.raises(ValueError):
        ClusterBatchSampler([0, 1], batch_size=0)
    with pytest.raises(ValueError):
        ClusterBatchSampler([0, 1], batch_size=2, world_size=2, rank=2)
