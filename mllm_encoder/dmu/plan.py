"""``clip-moe dmu plan``: what a run will do and need, read from its config and the data index, before any work.

Per training stage: the samples, the clusters used and skipped, the optimizer steps, the passes over the
stage's epoch plan and the samples dropped per pass, all from the sampler's own epoch plan
(:class:`~mllm_encoder.dmu.sampler.ClusterBatchSampler`) and the pipeline's own step counts
(:class:`~mllm_encoder.dmu.pipeline.RunContext`). Before the cluster stages have run, the plan assumes
clusters of equal size (``(image_clusters * text_clusters) ** stage`` of them); once a run directory holds
``labels.npy``, the real clusters are used. Memory and disk come from the base's config (parameter counts on
the ``meta`` device, no weights read); activation memory is an estimate (see :func:`activation_bytes`).
A config that cannot run (no cluster reaches one global batch) is refused with one line naming the key.
"""

import dataclasses
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from mllm_encoder.checkpoint import read_model_type
from mllm_encoder.data import TarShardDataset, build_record_index, expand_shards
from mllm_encoder.data.records import record_index_stamp, saved_record_index
from mllm_encoder.dmu.config import DATA_INDEX, METHODS, RunConfig, StageSection
from mllm_encoder.dmu.features import FEATURE_DTYPE
from mllm_encoder.dmu.pipeline import RunContext
from mllm_encoder.dmu.resources import INDEXED_FORMATS, RECORDS_INDEX, SHARDS_INDEX, data_format
from mllm_encoder.dmu.sampler import ClusterBatchSampler
from mllm_encoder.dmu.stages import steps_for
from mllm_encoder.dmu.trainer import select_trainable
from mllm_encoder.loading import model_class_for, read_config
from mllm_encoder.upcycle import moe_config

FEATURE_BYTES = FEATURE_DTYPE.itemsize  # bytes per stored feature value (float16 parts, dmu/features.py)
INDEX_BYTES_PER_SAMPLE = 24  # three int64 offsets per record (data/records.py); tar shards map theirs
ADAM_BYTES = 8  # two float32 moments per trainable parameter
GIB = 1024**3


@dataclass(frozen=True)
class StagePlan:
    """One training stage of the plan."""

    name: str
    section: str  # the config section of its hyper-parameters
    samples: int
    clusters_used: int
    clusters_skipped: int
    steps: int
    passes: float
    samples_dropped: int  # per pass
    clusters_estimated: bool
    trainable_params: int
    gpu_bytes: int


@dataclass
class RunPlan:
    """What ``clip-moe dmu run`` of one method will do and need."""

    method: str
    world_size: int
    num_samples: int
    dense_params: int
    moe_params: int
    stages: List[StagePlan]
    feature_bytes: int
    checkpoint_bytes: int
    host_bytes: int
    notes: List[str] = dataclasses.field(default_factory=list)


def count_samples(config: RunConfig) -> int:
    """The training set's size from its index: the run's (``run_dir/data_index``) when it is there, else one
    built in a temporary directory (records) or in memory (tar shards) and discarded."""
    data, index_dir = config.data, Path(config.run_dir) / DATA_INDEX
    fmt = data_format(data)
    if fmt not in INDEXED_FORMATS:
        raise ValueError(f"data.format: dmu plan reads {', '.join(INDEXED_FORMATS)} training data, got {fmt!r}")
    try:
        if fmt == "webdataset":
            shards_dir = index_dir / SHARDS_INDEX
            return len(TarShardDataset(expand_shards(data.train), None, None, index_dir=_existing(shards_dir)))
        with tempfile.TemporaryDirectory() as scratch:  # the strings stream to disk, not into memory
            options = dict(allow_absolute_paths=data.allow_absolute_paths)
            stamp = record_index_stamp(data.train, fmt, data.image_root, **options)
            saved = saved_record_index(index_dir / RECORDS_INDEX, stamp)  # the run's index, never rewritten here
            if saved is not None:
                return len(saved)
            scratch_dir = Path(scratch) / RECORDS_INDEX
            return len(build_record_index(data.train, fmt, data.image_root, index_dir=scratch_dir, **options))
    except OSError as error:
        raise ValueError(f"data.train: cannot open {data.train} ({error.strerror or error})") from error


def _existing(path: Path) -> Optional[Path]:
    return path if path.is_dir() else None


def _meta_model(config):
    with torch.device("meta"):
        model = model_class_for(config.model_type, "base_model")(config)
    total = sum(param.numel() for param in model.parameters())
    return model, total


def _trainable_params(model, trainable: str) -> int:
    return sum(param.numel() for param in select_trainable(model, trainable).values())


def activation_bytes(model_config, batch: int, precision_bytes: int, checkpointing: bool, top_k: int = 1) -> int:
    """Estimated activation memory of one training micro-batch: ``s * b * h * (15 + 19 k)`` bytes per layer in
    16-bit (Korthikanti et al. 2022's ``34 s b h`` for a dense layer with memory-efficient attention, its
    MLP share ``19 s b h`` times the experts a token visits), doubled for float32; with gradient checkpointing
    only each layer's input (``2 s b h``) plus one layer. An estimate, not a measurement."""
    total = 0
    for tower in (model_config.vision_config, model_config.text_config):
        if getattr(tower, "image_size", None):
            tokens = (tower.image_size // tower.patch_size) ** 2 + 1
        else:
            tokens = tower.max_position_embeddings
        per_token_layer = 15 + 19 * (top_k if getattr(tower, "num_experts", 1) > 1 else 1)
        unit = tokens * batch * tower.hidden_size * precision_bytes // 2
        layers = tower.num_hidden_layers
        total += unit * (2 * layers + per_token_layer) if checkpointing else unit * per_token_layer * layers
    return total


def _stage_labels(config: RunConfig, stage: int, num_samples: int) -> tuple:
    """The labels an MCL stage trains on: the run's ``labels.npy`` when it exists, else equal-size clusters."""
    saved = Path(config.run_dir) / "dmu" / f"cluster_{stage - 1}" / "labels.npy"
    if saved.is_file():
        return np.load(saved), False
    clusters = (config.dmu.image_clusters * config.dmu.text_clusters) ** stage
    return np.arange(num_samples, dtype=np.int64) % clusters, True


def _epoch_plan(labels, section: StageSection, name: str, world_size: int, where: str, estimated: bool):
    try:
        return ClusterBatchSampler(labels, section.batch_size, world_size, drop_last=section.drop_last).epoch_plan()
    except ValueError:
        sizes = np.bincount(labels[labels >= 0])
        assumed = " (assumed equal in size)" if estimated else ""
        raise ValueError(
            f"{where}: {name}.batch_size: a global batch of {section.batch_size} x {world_size} processes is larger "
            f"than any of the {np.count_nonzero(sizes)} clusters{assumed} of {len(labels)} samples (largest: "
            f"{sizes.max()}); lower {name}.batch_size or the clusters (dmu.image_clusters, dmu.text_clusters)"
        ) from None


def plan_run(config: RunConfig, method: str = "dmu", world_size: int = 1, where: str = "config") -> RunPlan:
    """The plan of ``clip-moe dmu run --method METHOD`` on ``world_size`` processes; ``where`` (the config file)
    starts every refusal."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    read_model_type(config.base_model)
    num_samples = count_samples(config)
    if num_samples == 0:
        raise ValueError(f"{where}: data.train: {config.data.train} holds no sample")
    dense_config = read_config(config.base_model, model_class_for(read_model_type(config.base_model), "base_model"))
    if config.dmu.text_context is not None:
        dense_config.text_config.max_position_embeddings = config.dmu.text_context
    dmu = config.dmu
    sparse_config = moe_config(dense_config, dmu.num_experts, dmu.top_k, dmu.moe_layers)
    dense_model, dense_params = _meta_model(dense_config)
    moe_model, moe_params = _meta_model(sparse_config)
    ctx = RunContext(config, types.SimpleNamespace(num_processes=world_size), num_samples)
    runtime = config.runtime
    precision = 4 if runtime.mixed_precision == "no" else 2

    def stage(name, section_name, section, labels, estimated, steps, model, model_config, params, **overrides):
        """``steps`` None: the stage's own epoch plan decides them (an MCL stage, as ``RunContext.mcl_steps``)."""
        section = dataclasses.replace(section, **overrides)
        epoch = _epoch_plan(labels, section, section_name, world_size, where, estimated)
        steps = steps_for(section, epoch) if steps is None else steps
        trainable = _trainable_params(model, section.trainable)
        top_k = dmu.top_k if model is moe_model else 1
        gpu = 4 * params + (4 + ADAM_BYTES) * trainable
        gpu += activation_bytes(model_config, section.batch_size, precision, runtime.gradient_checkpointing, top_k)
        passes = steps * section.grad_accum / epoch.batches
        drawn = epoch.samples + epoch.samples_dropped
        used, skipped = epoch.clusters_used, epoch.clusters_skipped
        return StagePlan(
            name, section_name, drawn, used, skipped, steps, passes, epoch.samples_dropped, estimated, trainable, gpu
        )

    random_labels = np.zeros(num_samples, dtype=np.int64)
    stages: List[StagePlan] = []
    mcl_stages = range(1, dmu.num_experts) if method == "dmu" else range(1, 2) if method == "control" else ()
    for s in mcl_stages:
        labels, estimated = _stage_labels(config, s, num_samples)
        dense = (dense_model, dense_config, dense_params)
        stages.append(stage(f"dmu/mcl_{s}", "mcl", config.mcl, labels, estimated, None, *dense))
    if method == "dmu":
        moe = (moe_model, sparse_config, moe_params)
        stages.append(stage("dmu/route", "route", config.route, random_labels, False, ctx.route_steps(), *moe))
    elif method == "control":
        dense = (dense_model, dense_config, dense_params)
        mcl_1_steps = stages[0].steps  # the random arm trains as long as MCL stage 1 (the run's rule)
        stages.append(stage("control/train", "mcl", config.mcl, random_labels, False, mcl_1_steps, *dense))
    else:
        upcycle = method == "upcycle"
        model = (moe_model, sparse_config, moe_params) if upcycle else (dense_model, dense_config, dense_params)
        overrides = {"trainable": "ffn+router"} if upcycle else {}
        steps = ctx.baseline_steps()
        stages.append(
            stage(f"{method}/train", "baseline", config.baseline, random_labels, False, steps, *model, **overrides)
        )

    projection = dense_config.projection_dim
    feature_bytes = len(mcl_stages) * num_samples * (2 * projection * FEATURE_BYTES + 8)
    checkpoint_bytes, trains_moe = 0, False
    for planned in stages:  # model/ (float32) plus one resumable train_state/ (model + AdamW moments)
        moe = planned.section == "route" or planned.name.startswith("upcycle")
        params, trains_moe = (moe_params if moe else dense_params), trains_moe or moe
        checkpoint_bytes += 4 * params + 4 * params + ADAM_BYTES * planned.trainable_params
    if method == "dmu":
        checkpoint_bytes += 4 * moe_params  # dmu/assemble/model
    if dmu.text_context is not None:
        checkpoint_bytes += 4 * dense_params  # base/stretch/model
    image = dense_config.vision_config.image_size
    batch = max(planned_section.batch_size for planned_section in (config.mcl, config.route, config.baseline))
    sample_bytes = 3 * image * image * 4 + 2 * 8 * dense_config.text_config.max_position_embeddings
    loader_batches = 2 * max(1, config.data.num_workers) + 1  # prefetch_factor 2 per worker, plus the one in use
    host = 4 * (moe_params if trains_moe else dense_params) + loader_batches * batch * sample_bytes
    host += INDEX_BYTES_PER_SAMPLE * num_samples + 8 * num_samples  # the index offsets and one labels array
    activations = ("float32" if precision == 4 else "16-bit") + (
        ", gradient checkpointing" if runtime.gradient_checkpointing else ""
    )
    notes = [
        "GPU per device: float32 weights, gradients and AdamW moments of the trainable parameters, plus the "
        f"activations of one micro-batch (an estimate, {activations} activations)"
    ]
    if any(planned.clusters_estimated for planned in stages):
        notes.append("clusters: * = assumed equal in size (the run's labels.npy replaces the estimate once clustered)")
    return RunPlan(
        method, world_size, num_samples, dense_params, moe_params, stages, feature_bytes, checkpoint_bytes, host, notes
    )


def _gib(value: int) -> str:
    return f"{value / GIB:.1f} GiB" if value >= GIB / 10 else f"{value / 1024**2:.1f} MiB"


def format_plan(plan: RunPlan) -> str:
    """The plan as a table (one row per training stage) and a summary of disk and memory."""
    header = ("stage", "samples", "clusters used/skipped", "steps", "passes", "dropped/pass", "GPU per device")
    rows = [
        (
            p.name,
            f"{p.samples:,}",
            f"{p.clusters_used}/{p.clusters_skipped}{'*' if p.clusters_estimated else ''}",
            f"{p.steps:,}",
            f"{p.passes:.2f}",
            f"{p.samples_dropped:,}",
            _gib(p.gpu_bytes),
        )
        for p in plan.stages
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        f"dmu plan: --method {plan.method}, {plan.world_size} process(es), {plan.num_samples:,} training samples; "
        f"base {plan.dense_params / 1e6:.1f}M parameters, MoE {plan.moe_params / 1e6:.1f}M",
        "  ".join(text.ljust(width) for text, width in zip(header, widths)),
    ]
    lines += ["  ".join(text.ljust(width) for text, width in zip(row, widths)) for row in rows]
    lines += [
        f"disk: features {_gib(plan.feature_bytes)}, checkpoints {_gib(plan.checkpoint_bytes)}",
        f"host RAM per process: ~{_gib(plan.host_bytes)} (float32 model, loader batches, index offsets, labels)",
        *plan.notes,
    ]
    return "\n".join(lines)
