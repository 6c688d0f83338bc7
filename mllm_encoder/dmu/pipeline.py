"""``clip-moe dmu run``: the whole method (or a baseline) from one config, resumable stage by stage.

Run directory::

    manifest.json            finished stages and what they produced (atomic)
    run_config.yaml          the config the run's stages use (a copy of the manifest's ``config``; a resume
                             may change only what no finished stage depends on, see ``dmu/preflight.py``)
    run.log                  the log of every invocation
    data_index/              the training data's index: records/ (JSON/CSV/folder) or shards/ (tar offsets)
    base/stretch/model/      the base with a stretched text context (only with dmu.text_context)
    base/eval/metrics.json
    dmu/extract_{s}/         features_rank{r}.safetensors
    dmu/cluster_{s}/         labels.npy, cluster_sizes.json, cluster_sizes.png
    dmu/mcl_{s}/             model/, train_state/step_*/, tensorboard/, history.json, summary.json
    dmu/assemble/model/  dmu/route/...  dmu/eval/metrics.json
    finetune/train/...  upcycle/train/...  {method}/eval/metrics.json
    control/train/...  control/eval/  expert_1/eval/   the stage-level control (``--method control``)

The stage names are this module's (:func:`mcl_stage`, :func:`cluster_stage`, :func:`train_stage`,
``ROUTE_STAGE``); each stage's manifest entry records the paths of what it wrote (``model``, ``history``,
``summary``, ``features``, ``labels``, ``metrics_file``), and every reader takes them from there.
"""

import functools
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import yaml
from accelerate.utils import set_seed

from mllm_encoder.atomic import atomic_write_json, atomic_write_text
from mllm_encoder.checkpoint import read_model_type
from mllm_encoder.distributed import DistState
from mllm_encoder.dmu.config import DATA_INDEX, METHODS, RunConfig, config_from_dict
from mllm_encoder.dmu.evaluation import evaluate_checkpoint, metrics_path
from mllm_encoder.dmu.preflight import (
    check_against_base,
    check_against_data,
    check_config_change,
    check_run_directory,
)
from mllm_encoder.dmu.resources import TrainingData, load_model, load_training_data
from mllm_encoder.dmu.run_state import Manifest
from mllm_encoder.dmu.stages import (
    assemble_models,
    epoch_plan,
    run_cluster,
    run_extract,
    run_stretch,
    run_training,
    steps_for,
    train_config,
    training_outputs,
)
from mllm_encoder.locking import directory_lock, hold
from mllm_encoder.upcycle import sparse_upcycle

logger = logging.getLogger(__name__)
Stage = Tuple[str, Callable[[], Dict[str, Any]]]
ROUTE_STAGE = "dmu/route"


def mcl_stage(stage: int) -> str:
    """The manifest name of MCL stage ``stage`` (1 .. N-1): its model is expert ``stage`` of the DMU model."""
    return f"dmu/mcl_{stage}"


def cluster_stage(stage: int) -> str:
    """The manifest name of the clustering that gives MCL stage ``stage + 1`` its pseudo-labels."""
    return f"dmu/cluster_{stage}"


def train_stage(method: str) -> str:
    """The manifest name of the one training stage of a baseline (``finetune``, ``upcycle``) or of the control's
    random-batch arm (``control``)."""
    return f"{method}/train"


FROZEN_CONFIG_NAME = "run_config.yaml"


@dataclass
class RunContext:
    """What every stage of one run shares."""

    config: RunConfig
    accelerator: Any
    num_samples: int
    stop_after_step: Optional[int] = None
    training: Optional[TrainingData] = None  # the run's training set, built once and shared by every stage

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run_dir)

    @property
    def base_model(self) -> Path:
        """The dense model every method starts from: the configured base, or its text-stretched copy."""
        if self.config.dmu.text_context is None:
            return Path(self.config.base_model)
        return self.run_dir / "base" / "stretch" / "model"

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    def _steps(self, section, labels_path: Optional[Path] = None) -> int:
        """``section.steps``, or its epochs over the batches the stage's plan draws from these labels (random
        batches over every sample without labels)."""
        labels = np.zeros(self.num_samples, np.int64) if labels_path is None else np.load(labels_path)
        return steps_for(section, epoch_plan(section, labels, self.world_size))

    def mcl_steps(self, labels_path: Optional[Path] = None) -> int:
        return self._steps(self.config.mcl, labels_path)

    def route_steps(self) -> int:
        return self._steps(self.config.route)

    def baseline_steps(self) -> int:
        """Equal training steps: the baselines train as long as all DMU stages together (an MCL stage given in
        epochs counted over random batches, as a baseline run has no clusters)."""
        return (self.config.dmu.num_experts - 1) * self.mcl_steps() + self.route_steps()


def _train_stage(
    ctx: RunContext,
    stage_dir: Path,
    build_model: Callable,
    section,
    steps: Callable[[], int],
    labels_path=None,
    seed=0,
    **overrides,
):
    def run() -> Dict[str, Any]:
        labels = np.load(labels_path) if labels_path is not None else None
        stage_steps = steps()  # at run time: an epoch is a pass over the plan of the labels made before
        cfg = train_config(section, ctx.config.runtime, stage_steps, seed, ctx.config.data.num_workers, **overrides)
        model_dir, history = run_training(
            build_model(),
            ctx.config.data,
            ctx.base_model,
            labels,
            cfg,
            stage_dir,
            ctx.accelerator,
            ctx.stop_after_step,
            desc=str(stage_dir.relative_to(ctx.run_dir)),
            training=ctx.training,
        )
        return {**training_outputs(stage_dir), "steps": stage_steps, "final_loss": history[-1]["loss"]}

    return run


def _eval_stage(ctx: RunContext, model_dir: Path, out_dir: Path) -> Callable[[], Dict[str, Any]]:
    def run() -> Dict[str, Any]:
        metrics = evaluate_checkpoint(model_dir, ctx.config.eval, ctx.accelerator, out_dir, ctx.base_model)
        written = {"metrics_file": str(metrics_path(out_dir))} if metrics else {}
        return {"model": str(model_dir), "metrics": metrics, **written}

    return run


def dmu_stages(ctx: RunContext) -> List[Stage]:
    """extract/cluster/MCL for stages 1..N-1, assemble N experts, tune the routers."""
    cfg, root = ctx.config, ctx.run_dir / "dmu"
    models, labels, stages = [ctx.base_model], None, []
    base = functools.partial(load_model, ctx.base_model)  # every MCL stage starts from the base
    for s in range(1, cfg.dmu.num_experts):
        features, cluster, stage_dir = root / f"extract_{s - 1}", root / f"cluster_{s - 1}", root / f"mcl_{s}"
        stages.append((f"dmu/extract_{s - 1}", _extract_stage(ctx, models[-1], features)))
        stages.append((cluster_stage(s - 1), _cluster_stage(ctx, features, cluster, labels)))
        labels = cluster / "labels.npy"
        mcl = _train_stage(
            ctx, stage_dir, base, cfg.mcl, functools.partial(ctx.mcl_steps, labels), labels, cfg.seed + s
        )
        stages.append((mcl_stage(s), mcl))
        models.append(stage_dir / "model")
    assembled = root / "assemble" / "model"
    stages.append(("dmu/assemble", _assemble_stage(ctx, models, assembled)))
    assembled_model = functools.partial(load_model, assembled)
    route = _train_stage(ctx, root / "route", assembled_model, cfg.route, ctx.route_steps, None, cfg.seed)
    stages.append((ROUTE_STAGE, route))
    return stages + [("dmu/eval", _eval_stage(ctx, root / "route" / "model", root / "eval"))]


def _extract_stage(ctx: RunContext, model_dir: Path, out: Path):
    def run() -> Dict[str, Any]:
        cfg = ctx.config
        features = run_extract(
            model_dir, cfg.data, out, ctx.accelerator, cfg.dmu.extract_batch_size, ctx.base_model, ctx.training
        )
        return {"features": str(features)}

    return run


def _assemble_stage(ctx: RunContext, models: List[Path], out: Path):
    def run() -> Dict[str, Any]:
        if ctx.accelerator.is_main_process:
            assemble_models(models, ctx.config.dmu.top_k, out, ctx.config.dmu.moe_layers)
        ctx.accelerator.wait_for_everyone()
        return {"model": str(out), "experts": [str(model) for model in models]}

    return run


def _cluster_stage(ctx: RunContext, features: Path, out: Path, previous: Optional[Path]):
    def run() -> Dict[str, Any]:
        cfg = ctx.config
        run_cluster(  # every rank clusters its share of the features
            features,
            ctx.num_samples,
            out,
            previous,
            cfg.dmu,
            cfg.seed,
            DistState.from_torch(),
            ctx.accelerator.device,
        )
        ctx.accelerator.wait_for_everyone()
        labels = np.load(out / "labels.npy")
        return {"labels": str(out / "labels.npy"), "num_clusters": int(len(np.unique(labels[labels >= 0])))}

    return run


def baseline_stages(ctx: RunContext, method: str) -> List[Stage]:
    """Direct fine-tuning (dense FFNs) or sparse upcycling (copied experts + routers), at DMU's step count."""
    cfg, stage_dir = ctx.config, ctx.run_dir / method / "train"
    build, overrides = functools.partial(load_model, ctx.base_model), {}
    if method == "upcycle":
        build = functools.partial(_sparse_upcycled, ctx)
        overrides = {"trainable": "ffn+router", "aux_loss_coef": cfg.route.aux_loss_coef}
    train = _train_stage(ctx, stage_dir, build, cfg.baseline, ctx.baseline_steps, None, cfg.seed, **overrides)
    return [
        (train_stage(method), train),
        (f"{method}/eval", _eval_stage(ctx, stage_dir / "model", ctx.run_dir / method / "eval")),
    ]


def control_stages(ctx: RunContext) -> List[Stage]:
    """The stage-level control: DMU's MCL stage 1 (one-cluster batches; the same stages a ``dmu`` run has, so
    either run reuses the other's) against the same stage on random batches, same recipe, seed and steps;
    both evaluated as dense models (``expert_1`` and ``control`` in ``results.json``)."""
    cfg, root = ctx.config, ctx.run_dir
    first = [stage for stage in dmu_stages(ctx) if stage[0] in ("dmu/extract_0", cluster_stage(0), mcl_stage(1))]
    base = functools.partial(load_model, ctx.base_model)
    mcl_1_steps = functools.partial(ctx.mcl_steps, root / "dmu" / "cluster_0" / "labels.npy")  # MCL stage 1's
    random = _train_stage(ctx, root / "control" / "train", base, cfg.mcl, mcl_1_steps, None, cfg.seed + 1)
    return first + [
        ("expert_1/eval", _eval_stage(ctx, root / "dmu" / "mcl_1" / "model", root / "expert_1" / "eval")),
        (train_stage("control"), random),
        ("control/eval", _eval_stage(ctx, root / "control" / "train" / "model", root / "control" / "eval")),
    ]


def _sparse_upcycled(ctx: RunContext):
    dmu = ctx.config.dmu
    return sparse_upcycle(load_model(ctx.base_model), dmu.num_experts, dmu.top_k, dmu.moe_layers)


def _stretch_stage(ctx: RunContext) -> Callable[[], Dict[str, Any]]:
    def run() -> Dict[str, Any]:
        positions = ctx.config.dmu.text_context
        if ctx.accelerator.is_main_process:
            run_stretch(ctx.config.base_model, positions, ctx.base_model)
        ctx.accelerator.wait_for_everyone()
        return {"model": str(ctx.base_model), "text_context": positions}

    return run


def plan(ctx: RunContext, method: str) -> List[Stage]:
    """The ordered stages of ``method``: the text stretch (if configured), the base model's evaluation, then
    DMU's stages, the stage-level control's or the baseline's."""
    base = [("base/eval", _eval_stage(ctx, ctx.base_model, ctx.run_dir / "base" / "eval"))]
    if ctx.config.dmu.text_context is not None:
        base.insert(0, ("base/stretch", _stretch_stage(ctx)))
    stages = {"dmu": dmu_stages, "control": control_stages}.get(method)
    return base + (stages(ctx) if stages else baseline_stages(ctx, method))


def _with_added_keys(
    recorded: Dict[str, Any], current: Dict[str, Any], prefix: str = ""
) -> Tuple[Dict[str, Any], List[str]]:
    """A copy of a run's ``recorded`` config whose missing keys (added to the project since the run started)
    take their ``current`` values, so that a new key never blocks a resume; and those keys' names."""
    filled, added = dict(recorded), []
    for key, value in current.items():
        if key not in recorded:
            filled[key] = value
            added.append(prefix + key)
        elif isinstance(value, dict) and isinstance(recorded[key], dict):
            filled[key], nested = _with_added_keys(recorded[key], value, f"{prefix}{key}.")
            added += nested
    return filled, added


def _record_config(config: RunConfig, manifest: Manifest, where: str, config_file: Optional[str]) -> None:
    """Check a changed config against the finished stages (:func:`check_config_change`), then record the config
    in the manifest and its readable copy ``run_config.yaml`` (never the user's config file itself)."""
    run_dir = Path(config.run_dir)
    current = config.to_dict()
    previous = manifest.config
    legacy = run_dir / "config.yaml"  # run directories made before the manifest recorded the config
    if previous is None and legacy.is_file() and manifest.stages:
        previous = yaml.safe_load(legacy.read_text())
    if previous is not None:
        previous, added = _with_added_keys(previous, current)
        if added and manifest.writable:
            logger.warning(
                "%s: the run started before %s existed; its finished stages were made without them, later stages "
                "use this config's values",
                run_dir,
                ", ".join(added),
            )
        previous = config_from_dict(previous, where).to_dict()
        changed = check_config_change(previous, current, manifest.stages, run_dir, where)
        if changed and manifest.writable:
            logger.warning("%s: applying the changed %s (no finished stage depends on them)", run_dir, changed)
    manifest.record_config(current)
    copy = run_dir / FROZEN_CONFIG_NAME
    if manifest.writable and (config_file is None or copy.resolve() != Path(config_file).resolve()):
        atomic_write_text(copy, yaml.safe_dump(current, sort_keys=False))


def check_run_inputs(
    config: RunConfig,
    methods: Sequence[str] = METHODS,
    where: str = "config",
    accelerator=None,
    overwrite: bool = False,
) -> TrainingData:
    """Check everything before any stage runs: the run directory (the output rule), the base model, the config
    against the base and the installed libraries, the training data and the config against its size; returns
    the run's training data. Its index is built once under ``run_dir/data_index`` (only when the data is
    readable) and reused by every stage, rank and resume."""
    data_inputs = (config.data.train, config.data.image_root, config.eval.data, config.eval.image_root)
    check_run_directory(config.run_dir, (config.base_model, *data_inputs), overwrite)
    read_model_type(config.base_model)
    check_against_base(config, where, methods)
    index_dir = Path(config.run_dir) / DATA_INDEX
    new_run_dir = not Path(config.run_dir).exists()
    try:
        training = load_training_data(config.data, config.base_model, index_dir, accelerator, config.dmu.text_context)
    except OSError as error:
        raise ValueError(f"data.train: cannot open {config.data.train} ({error.strerror or error})") from error
    world_size = accelerator.num_processes if accelerator is not None else 1
    try:
        check_against_data(config, where, methods, len(training), world_size)
    except ValueError:
        training.close()
        if new_run_dir and (accelerator is None or accelerator.is_main_process):
            shutil.rmtree(config.run_dir, ignore_errors=True)  # only the index this call wrote: nothing was run
        raise
    return training


def run_pipeline(
    config: RunConfig,
    method: str,
    accelerator,
    stop_after_step: Optional[int] = None,
    where: str = "config",
    config_file: Optional[str] = None,
    overwrite: bool = False,
    training: Optional[TrainingData] = None,
) -> Dict[str, Any]:
    """Run (or resume) every unfinished stage of ``method``; returns ``{stage: result}`` of the manifest.

    Everything is checked (the config when it was built, then :func:`check_run_inputs`, unless the caller did
    and passes its ``training`` data) before the run directory is touched. ``where`` names the config in errors
    (``config_file``, the user's file, is never written). ``stop_after_step`` interrupts a training stage after
    that step (for tests).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    owned = training is None
    if owned:
        training = check_run_inputs(config, [method], where, accelerator, overwrite)
    try:
        return _run_stages(config, method, accelerator, stop_after_step, training, where, config_file)
    finally:
        if owned:
            training.close()  # the run leaves no shard file open


def _run_stages(
    config: RunConfig,
    method: str,
    accelerator,
    stop_after_step: Optional[int],
    training: TrainingData,
    where: str,
    config_file: Optional[str],
) -> Dict[str, Any]:
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with hold(directory_lock(run_dir), enabled=accelerator.is_main_process):  # a second run is refused
        manifest = Manifest(run_dir / "manifest.json", writable=accelerator.is_main_process)
        _record_config(config, manifest, where, config_file)
        accelerator.wait_for_everyone()  # every rank has read the same manifest before any stage starts
        ctx = RunContext(config, accelerator, len(training), stop_after_step, training)
        for position, (name, run) in enumerate(plan(ctx, method)):
            if manifest.is_done(name):
                logger.info("%s: done already, skipped", name)
                continue
            logger.info("%s: running", name)
            set_seed(config.seed + position)  # e.g. router initialisation: the same whether resumed or not
            manifest.mark_done(name, **run())
            accelerator.wait_for_everyone()
        results = collect_results(manifest)
        if accelerator.is_main_process and results:
            atomic_write_json(run_dir / "results.json", results)
        elif accelerator.is_main_process:
            logger.info("%s: no model was evaluated (no eval.data): results.json not written", run_dir)
    return manifest.stages


def collect_results(manifest: Manifest) -> Dict[str, Dict[str, Any]]:
    """``{name: metrics}`` for every evaluated model of the run (``base``, ``dmu``, ``finetune``, ``upcycle``, and
    the control's ``expert_1`` and ``control``); models that measured nothing (no ``eval.data``) are left out."""
    return {
        name.split("/")[0]: info["metrics"]
        for name, info in manifest.stages.items()
        if name.endswith("/eval") and info["metrics"]
    }
