"""k-means backends, the 3x3 stage label, accumulated labels, cluster reports and sharded features."""

import json

import numpy as np
import pytest
import torch
from dmu_helpers import TensorPairs, collate

from mllm_encoder.distributed import DistState
from mllm_encoder.dmu.clustering import accumulate_labels, cluster_sizes, kmeans, save_cluster_report, stage_labels
from mllm_encoder.dmu.features import extract_features, load_features


def _blobs(centres, per=30, seed=0):
    rng = np.random.default_rng(seed)
    points = np.concatenate([c + 0.05 * rng.standard_normal((per, len(c))) for c in centres])
    return points.astype(np.float32), np.repeat(np.arange(len(centres)), per)


def _same_partition(a, b):
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.mark.parametrize("backend", ["sklearn", "torch"])
def test_kmeans_recovers_separated_directions(backend):
    points, truth = _blobs(np.eye(4)[:3] * 5)
    labels = kmeans(points, 3, seed=0, backend=backend)
    assert labels.dtype == np.int64 and _same_partition(labels, truth)


def test_stage_label_is_text_times_image_clusters():
    image, image_truth = _blobs(np.eye(3) * 3, seed=1)
    text, _ = _blobs(np.eye(3) * 3, seed=2)
    order = np.random.default_rng(0).permutation(len(text))
    text, text_truth = text[order], np.repeat(np.arange(3), 30)[order]
    labels = stage_labels(image, text, backend="sklearn")
    image_part, text_part = labels % 3, labels // 3
    assert _same_partition(image_part, image_truth) and _same_partition(text_part, text_truth)
    assert set(labels.tolist()) <= set(range(9))


def test_accumulated_labels_are_dense_and_refine_the_previous():
    previous = np.array([0, 0, 5, 5, 8, 8])
    current = np.array([1, 2, 1, 1, 0, 0])
    labels = accumulate_labels(previous, current)
    np.testing.assert_array_equal(labels, [0, 1, 2, 2, 3, 3])  # 1, 2, 46, 46, 72, 72 relabelled
    with pytest.raises(ValueError):
        accumulate_labels(previous, current[:3])
    with pytest.raises(ValueError, match="cannot make"):
        kmeans(np.zeros((2, 4)), 3)


def test_cluster_report(tmp_path):
    png = save_cluster_report(np.array([0, 0, 1, 2, 2, 2]), tmp_path)
    assert json.loads((tmp_path / "cluster_sizes.json").read_text()) == {"0": 2, "1": 1, "2": 3}
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert cluster_sizes(np.array([3, 3])) == {3: 2}


class _Embedder(torch.nn.Module):
    def get_image_features(self, pixel_values):
        return pixel_values.flatten(1)[:, :4] * 2

    def get_text_features(self, input_ids, attention_mask=None):
        return input_ids[:, :3].float()


def test_features_sharded_over_ranks_merge_in_index_order(tmp_path):
    pairs = TensorPairs(n=11)
    for rank in range(2):
        extract_features(_Embedder(), pairs, collate, tmp_path, DistState(2, rank), batch_size=4)
    features = load_features(tmp_path)
    np.testing.assert_array_equal(features["index"], np.arange(11))
    unit = torch.nn.functional.normalize
    np.testing.assert_allclose(features["image"], unit(pairs.pixels.flatten(1)[:, :4], dim=1).numpy(), atol=1e-3)
    np.testing.assert_allclose(features["text"], unit(pairs.ids[:, :3].float(), dim=1).numpy(), atol=1e-3)
    with pytest.raises(ValueError, match="no feature files"):
        load_features(tmp_path / "missing")
