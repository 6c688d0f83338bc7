import numpy as np
import pytest

from mllm_encoder.dmu.sampler import ClusterBatchSampler


def _labels(seed=0, n=203, clusters=5):
    return np.random.default_rng(seed).integers(0, clusters, size=n)


def test_default_drops_partial_batches_and_never_mixes_clusters():
    labels = _labels()  # 5 clusters of about 40 samples
    sampler = ClusterBatchSampler(labels, batch_size=8, seed=3)
    batches = list(sampler)
    assert all(len(batch) == 8 for batch in batches)  # the official MCL sampler: full batches only
    assert all(len({labels[i] for i in batch}) == 1 for batch in batches)
    seen = [i for batch in batches for i in batch]
    assert len(seen) == len(set(seen))
    sizes = np.bincount(labels)
    assert len(batches) == len(sampler) == sum(n // 8 for n in sizes)
    plan = sampler.epoch_plan()
    assert (plan.batches, plan.samples, plan.clusters_used, plan.clusters_skipped) == (len(batches), len(seen), 5, 0)
    assert plan.samples_dropped == sum(n % 8 for n in sizes) == len(labels) - len(seen)


def test_clusters_smaller_than_a_global_batch_are_skipped():
    labels = np.array([0] * 20 + [1] * 7 + [2] * 3 + [-1] * 4)  # -1: no features, never drawn
    sampler = ClusterBatchSampler(labels, batch_size=4, world_size=2, rank=0, seed=0)
    plan = sampler.epoch_plan()
    assert (plan.batches, plan.samples, plan.clusters_used, plan.clusters_skipped) == (2, 16, 1, 2)
    assert plan.samples_dropped == 4 + 7 + 3
    assert all(labels[i] == 0 for batch in sampler for i in batch)
    with pytest.raises(ValueError, match="largest cluster: 20"):
        ClusterBatchSampler(labels, batch_size=16, world_size=2)


def test_keeping_partial_batches_is_an_option():
    labels = _labels()
    batches = list(ClusterBatchSampler(labels, batch_size=8, seed=3, drop_last=False))
    assert all(2 <= len(batch) <= 8 for batch in batches)
    assert all(len({labels[i] for i in batch}) == 1 for batch in batches)
    seen = [i for batch in batches for i in batch]
    assert len(seen) == len(set(seen))
    assert len(seen) == sum(n if n % 8 != 1 else n - 1 for n in np.bincount(labels))  # singletons dropped


def test_two_ranks_share_the_cluster_at_every_step():
    labels = _labels(1)
    ranks = [
        list(ClusterBatchSampler(labels, batch_size=4, world_size=2, rank=r, seed=7, epoch=2, drop_last=False))
        for r in range(2)
    ]
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
    assert [len(b) for b in batches] == [16, 16, 16]
    seen = sorted(i for b in batches for i in b)
    assert len(seen) == len(set(seen)) == 48 and set(seen) <= set(range(50))
    assert batches[0] != sorted(batches[0])  # shuffled


def test_bad_arguments():
    with pytest.raises(ValueError):
        ClusterBatchSampler([0, 1], batch_size=0)
    with pytest.raises(ValueError):
        ClusterBatchSampler([0, 1], batch_size=2, world_size=2, rank=2)


@pytest.mark.parametrize("drop_last, grad_accum", [(True, 1), (False, 1), (True, 2)])
def test_one_epoch_is_one_pass_over_the_plan(drop_last, grad_accum):
    """``epochs: 1`` draws every sample of the stage's plan once: the micro-steps of the stage's optimizer steps
    are the plan's batches (dropped remainders never counted), for one or two ranks."""
    from mllm_encoder.dmu.config import StageSection
    from mllm_encoder.dmu.stages import epoch_plan, steps_for

    labels = _labels(seed=3, n=517, clusters=7)
    for world_size in (1, 2):
        section = StageSection(epochs=1.0, batch_size=8, grad_accum=grad_accum, drop_last=drop_last)
        plan = epoch_plan(section, labels, world_size)
        micro_steps = steps_for(section, plan) * grad_accum
        assert plan.batches <= micro_steps < plan.batches + grad_accum
        drawn = []
        for rank in range(world_size):
            sampler = ClusterBatchSampler(labels, 8, world_size, rank, drop_last=drop_last)
            drawn += [index for batch in list(sampler)[: plan.batches] for index in batch]
        assert len(drawn) == len(set(drawn)) == plan.samples == len(labels) - plan.samples_dropped
        two = StageSection(epochs=2.0, batch_size=8, grad_accum=grad_accum, drop_last=drop_last)
        assert steps_for(two, plan) * grad_accum >= 2 * plan.batches
    assert steps_for(StageSection(steps=5), plan) == 5
