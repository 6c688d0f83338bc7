"""Diversified Multiplet Upcycling: turn a dense CLIP into a CLIP-MoE (see ``docs/dmu.md``).

Stages: feature extraction and k-means pseudo-labels (``features``, ``clustering``), Multistage
Contrastive Learning on one-cluster batches (``sampler``, ``loss``, ``trainer``), expert assembly and
router tuning (``stages``), driven and resumed from one config by ``pipeline``. The experiments run on the
method (the CPU demo, the control worlds) live in :mod:`mllm_encoder.experiments`; nothing here imports them.
"""

from mllm_encoder.distributed import DistState, all_gather_with_grad
from mllm_encoder.dmu.clustering import accumulate_labels, kmeans, stage_labels
from mllm_encoder.dmu.config import RunConfig, config_from_dict, load_config
from mllm_encoder.dmu.sampler import ClusterBatchSampler
from mllm_encoder.dmu.trainer import TrainConfig, TrainingInterrupted, train
from mllm_encoder.losses import clip_contrastive_loss

__all__ = [
    "ClusterBatchSampler",
    "DistState",
    "RunConfig",
    "TrainConfig",
    "TrainingInterrupted",
    "accumulate_labels",
    "all_gather_with_grad",
    "clip_contrastive_loss",
    "config_from_dict",
    "kmeans",
    "load_config",
    "stage_labels",
    "train",
]
