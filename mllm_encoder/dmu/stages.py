"""The DMU stages as functions over directories: stretch, extract, cluster, train (MCL / router / baselines),
assemble.

Each stage reads checkpoint directories and writes its outputs under one stage directory; the pipeline
(:mod:`mllm_encoder.dmu.pipeline`) and the ``clip-moe dmu`` subcommands both call these. Loading and saving
live in :mod:`mllm_encoder.dmu.resources`.
"""

import contextlib
import dataclasses
import io
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from mllm_encoder.atomic import PathLike, atomic_write_bytes, atomic_write_json
from mllm_encoder.distributed import DistState, gather_sizes
from mllm_encoder.dmu.clustering import (
    accumulate_labels,
    gather_labels,
    kmeans_chunks,
    save_cluster_report,
)
from mllm_encoder.dmu.config import DataSection, DMUSection, RuntimeSection, StageSection
from mllm_encoder.dmu.features import extract_features, feature_files, feature_indices, iter_chunks
from mllm_encoder.dmu.resources import TrainingData, load_model, load_training_data, save_model
from mllm_encoder.dmu.sampler import ClusterBatchSampler, EpochPlan
from mllm_encoder.dmu.trainer import TrainConfig, train
from mllm_encoder.text_context import stretch_checkpoint
from mllm_encoder.upcycle import assemble_experts

logger = logging.getLogger(__name__)


def epoch_plan(section: StageSection, labels: Sequence[int], world_size: int) -> EpochPlan:
    """What one epoch of a stage draws from ``labels`` (one cluster for random batches): batches, samples,
    clusters used and skipped, samples dropped."""
    return ClusterBatchSampler(labels, section.batch_size, world_size, drop_last=section.drop_last).epoch_plan()


def steps_for(section: StageSection, plan: EpochPlan) -> int:
    """Optimizer steps of a stage: ``section.steps``, or its epochs as passes over the batches of ``plan``
    (rounded up), so that ``epochs: 1`` draws each sample of the plan once whatever it drops."""
    if section.steps is not None:
        return int(section.steps)
    return max(1, math.ceil(section.epochs * plan.batches / section.grad_accum))


def train_config(
    section: StageSection,
    runtime: RuntimeSection,
    steps: int,
    seed: int,
    num_workers: int = 0,
    **overrides: Any,
) -> TrainConfig:
    """The trainer's config of one stage; ``overrides`` replace fields of ``section`` (e.g. ``trainable``)."""
    return TrainConfig(dataclasses.replace(section, **overrides), steps, seed, runtime, num_workers)


@contextlib.contextmanager
def stage_training_data(
    training: Optional[TrainingData],
    data: DataSection,
    processors_dir: PathLike,
    index_dir: Optional[PathLike] = None,
    accelerator=None,
) -> Iterator[TrainingData]:
    """The run's ``training`` data, or the training set built for this stage alone (closed when it ends), its
    index built once in ``index_dir`` for the ranks of ``accelerator`` (see :func:`load_training_data`)."""
    if training is not None:
        yield training
        return
    built = load_training_data(data, processors_dir, index_dir, accelerator)
    try:
        yield built
    finally:
        built.close()


def run_extract(
    model_dir: PathLike,
    data: DataSection,
    out_dir: PathLike,
    accelerator,
    batch_size: int = 256,
    processors_dir: Optional[PathLike] = None,
    training: Optional[TrainingData] = None,
    index_dir: Optional[PathLike] = None,
) -> Path:
    """Stage ``extract``: every rank embeds its share of the training set into ``out_dir``.

    Samples are preprocessed with the processors of ``processors_dir`` (default ``model_dir``'s): the pipeline
    passes the base, whose processors every stage's checkpoint carries, and the run's ``training`` data (built
    once per run); without it the training set is built here, its index in ``index_dir`` (built once, shared
    by the ranks) or, without that, in memory.

    Shards of an earlier, interrupted extraction (possibly with another number of processes) are removed
    first by the main process, so the directory ends with exactly one shard per rank of this run.
    """
    out_dir = Path(out_dir)
    if accelerator.is_main_process and out_dir.is_dir():
        for stale in out_dir.glob("features_rank*.safetensors"):
            stale.unlink()
    accelerator.wait_for_everyone()
    model = load_model(model_dir).to(accelerator.device)
    with stage_training_data(training, data, processors_dir or model_dir, index_dir, accelerator) as stage_data:
        dataset, collator = stage_data.for_stage()
        state = DistState(accelerator.num_processes, accelerator.process_index)
        with accelerator.autocast():
            extract_features(model, dataset, collator, out_dir, state, batch_size, data.num_workers)
    collator.check(final=True)
    if collator.num_seen and collator.num_bad == collator.num_seen:  # even max_bad_fraction 1.0 needs one sample
        raise ValueError(
            f"{data.train}: none of the {collator.num_seen} samples could be read (see the warnings above); check "
            "the image paths and data.image_root (--image-root)"
        )
    accelerator.wait_for_everyone()
    return out_dir


def run_cluster(
    features_dir: PathLike,
    num_samples: int,
    out_dir: PathLike,
    previous_labels: Optional[PathLike] = None,
    clustering: Optional[DMUSection] = None,
    seed: int = 0,
    state: Optional[DistState] = None,
    device: Union[str, torch.device] = "cpu",
) -> Path:
    """Stage ``cluster``: k-means both modalities, accumulate with the previous labels; writes ``labels.npy``.

    ``clustering`` gives the clusters per modality and the k-means settings (``image_clusters``,
    ``text_clusters``, ``kmeans_backend``, ``kmeans_sample_size``, ``kmeans_restarts``, ``kmeans_tolerance``;
    default: :class:`DMUSection`'s).

    Every rank of ``state`` calls this: each streams its share of the feature files, the k-means all-reduces
    over the group (see :mod:`mllm_encoder.dmu.clustering`), and the main process writes the labels. They cover
    every dataset index; samples without features (bad at extraction) get -1 and are never drawn.
    """
    state, clustering = state or DistState(), clustering or DMUSection()
    files = feature_files(features_dir)[state.rank :: state.world_size]
    index = feature_indices(files)
    total = int(sum(gather_sizes(len(index), state, device)))
    if total == 0:
        raise ValueError(
            f"{features_dir}: the feature files hold no sample: every training sample was bad or the training set "
            "is empty (see the bad-sample warnings of the extraction)"
        )
    labels = {}
    image_clusters, text_clusters = clustering.image_clusters, clustering.text_clusters
    settings = (clustering.kmeans_sample_size, clustering.kmeans_restarts, clustering.kmeans_tolerance)
    for name, k, modality_seed in (("image", image_clusters, seed), ("text", text_clusters, seed + 1)):

        def chunks(name: str = name):
            return ((part, rows[name]) for part, rows in iter_chunks(files, name))

        try:
            labels[name] = kmeans_chunks(
                chunks, k, num_samples, modality_seed, clustering.kmeans_backend, state, device, *settings
            )
        except ValueError as error:
            raise ValueError(f"{features_dir}: {name} features: {error}") from error
    index, current = gather_labels(index, labels["text"] * image_clusters + labels["image"], state, device)
    if previous_labels is not None:
        previous = np.load(previous_labels)[index]
        if (previous < 0).any():
            raise ValueError(f"{previous_labels}: samples with features have no previous label")
        current = accumulate_labels(previous, current, image_clusters * text_clusters)
    out_dir = Path(out_dir)
    if state.is_main:
        full = np.full(num_samples, -1, dtype=np.int64)
        full[index] = current
        out_dir.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.save(buffer, full)
        atomic_write_bytes(out_dir / "labels.npy", buffer.getvalue())
        save_cluster_report(current, out_dir, title=f"{len(np.unique(current))} pseudo-label clusters")
    return out_dir / "labels.npy"


def run_training(
    model: torch.nn.Module,
    data: DataSection,
    processors_dir: PathLike,
    labels: Optional[Sequence[int]],
    cfg: TrainConfig,
    stage_dir: PathLike,
    accelerator,
    stop_after_step: Optional[int] = None,
    desc: str = "train",
    training: Optional[TrainingData] = None,
) -> Tuple[Path, List[Dict[str, float]]]:
    """Train ``model`` (resuming from ``stage_dir/train_state``), then save ``stage_dir/model`` and the history.

    ``labels`` None: random batches (one cluster holding everything). ``training``: the run's training data
    (built once per run); without it the training set is built here.
    """
    stage_dir = Path(stage_dir)
    with contextlib.ExitStack() as cleanup:
        dataset, collator = cleanup.enter_context(stage_training_data(training, data, processors_dir)).for_stage()
        labels = np.zeros(len(dataset), dtype=np.int64) if labels is None else np.asarray(labels)
        if len(labels) != len(dataset):
            raise ValueError(f"{len(labels)} pseudo-labels for a training set of {len(dataset)} samples")
        writer = _tensorboard_writer(stage_dir / "tensorboard") if accelerator.is_main_process else None
        if writer is not None:
            cleanup.callback(writer.close)
        started = time.perf_counter()
        history = train(
            model, dataset, collator, labels, cfg, stage_dir / "train_state", accelerator, writer, stop_after_step, desc
        )
    outputs = training_outputs(stage_dir)
    if accelerator.is_main_process:
        save_model(model, outputs["model"], processors_dir)
        atomic_write_json(outputs["history"], history)
        summary = stage_summary(labels, cfg, accelerator.num_processes, time.perf_counter() - started)
        atomic_write_json(outputs["summary"], summary)
    accelerator.wait_for_everyone()
    return Path(outputs["model"]), history


def training_outputs(stage_dir: PathLike) -> Dict[str, str]:
    """What :func:`run_training` writes into ``stage_dir``: ``model`` (the checkpoint directory), ``history``
    (``history.json``, one record per step) and ``summary`` (``summary.json``); the pipeline records these paths
    in the run's manifest, where every reader takes them from."""
    stage_dir = Path(stage_dir)
    return {
        "model": str(stage_dir / "model"),
        "history": str(stage_dir / "history.json"),
        "summary": str(stage_dir / "summary.json"),
    }


def stage_summary(labels: Sequence[int], cfg: TrainConfig, world_size: int, seconds: float) -> Dict[str, Any]:
    """The machine-readable account of a training stage (``summary.json``): steps, samples seen, passes over
    the plan (``epochs``), samples drawn, clusters used and skipped and samples dropped per epoch, and the wall
    time of the invocation that finished it."""
    plan = ClusterBatchSampler(labels, cfg.stage.batch_size, world_size, drop_last=cfg.stage.drop_last).epoch_plan()
    micro_steps = cfg.steps * cfg.stage.grad_accum
    return {
        "steps": cfg.steps,
        "samples_seen": round(micro_steps * plan.samples / plan.batches),  # exact with drop_last
        "epochs": micro_steps / plan.batches,
        "batches_per_epoch": plan.batches,
        "samples_drawn_per_epoch": plan.samples,
        "clusters_used": plan.clusters_used,
        "clusters_skipped": plan.clusters_skipped,
        "samples_dropped_per_epoch": plan.samples_dropped,
        "drop_last": cfg.stage.drop_last,
        "world_size": world_size,
        "seconds": round(seconds, 3),
    }


def _tensorboard_writer(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.warning("tensorboard is not installed: no TensorBoard events (pip install tensorboard)")
        return None
    return SummaryWriter(str(log_dir))


def run_stretch(model_dir: PathLike, positions: int, out_dir: PathLike) -> Path:
    """Stage ``stretch``: the base with its text context stretched to ``positions`` (Long-CLIP), tokenizer too."""
    return stretch_checkpoint(model_dir, out_dir, positions, overwrite=True)  # a rerun replaces its own output


def assemble_models(
    model_dirs: Sequence[PathLike], top_k: int, out_dir: PathLike, moe_layers: Optional[List[int]] = None
) -> Path:
    """Stage ``assemble``: the FFNs of N dense models become N experts per layer (top-k routing)."""
    model = assemble_experts([str(path) for path in model_dirs], top_k=top_k, moe_layers=moe_layers)
    return save_model(model, out_dir, model_dirs[0])


def read_history(stage_dir: PathLike) -> List[Dict[str, float]]:
    """The per-step training history saved by :func:`run_training`."""
    return json.loads(Path(training_outputs(stage_dir)["history"]).read_text())
