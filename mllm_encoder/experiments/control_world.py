"""``clip-moe demo --control-world WORLD``: the stage-level control alone, in a world of the marker generator.

Both worlds are pre-registered in ``docs/dmu.md``; both use :mod:`mllm_encoder.experiments.marker_world` and, per
seed, MCL stage 1 of the pipeline (one-cluster batches) against the same stage on random batches (the demo's
control), equal steps, with the demo's base recipe, run config, control and steps:

* ``audit`` ("Control replication"): the audit's world; the base trains on the fine-tuning captions.
* ``suppressed`` ("Control in a world where the size is suppressed"): the base trains on pretraining captions
  that never name the disc's size; two gates (size suppressed in the base, size not a cluster axis) are
  computed from the base and the stage-1 clusters and reported with the outcome.
* ``seldom`` ("Control in a world where the size is seldom named"): the pretraining captions name the size
  with probability p, the first of a ladder whose base passes G1 and G3 (size carried by the base's image
  embeddings); the calibration looks at the base alone, never at either arm.

Metrics on the held-out pairs: caption-swap accuracy on the size, a linear probe of the size on the image
embeddings, R@1 both ways.
"""

import functools
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from mllm_encoder.atomic import atomic_write_json
from mllm_encoder.dmu.accelerator import build_accelerator
from mllm_encoder.dmu.config import config_from_dict
from mllm_encoder.dmu.pipeline import cluster_stage, mcl_stage, train_stage
from mllm_encoder.dmu.resources import load_model
from mllm_encoder.dmu.run_state import Manifest
from mllm_encoder.experiments.demo import (
    DEFAULT,
    QUICK,
    DemoSettings,
    Steps,
    run_config,
    run_method,
    single_threaded,
    train_base,
)
from mllm_encoder.experiments.evaluator import WorldEvaluator, marker_world_evaluator
from mllm_encoder.experiments.marker_world import (
    ATTRIBUTES,
    load_marker_samples,
    write_marker_split,
    write_marker_world,
)
from mllm_encoder.experiments.report import compare, seed_statistics

METRICS = ("swap_size", "probe_size", "i2t_r1", "t2i_r1")
MAX_BASE_SWAP_SIZE = 65.0  # gate G1 (pre-registered)
MAX_SIZE_PURITY = 0.70  # gate G2 (pre-registered)
MIN_BASE_PROBE_SIZE = 75.0  # gate G3 of the calibrated world (pre-registered)
LEARNED_MARGIN = 5.0  # points above the base that count as "learned" (pre-registered)


@dataclass(frozen=True)
class ControlWorld:
    """One pre-registered control world.

    Attributes:
        label: the verdict's name of the world.
        size_mentions: the probabilities with which the base's pretraining captions name the size, tried in
            order; empty: the base trains on the fine-tuning captions (the audit's world, no gates).
        calibrated: the first probability whose base passes G1 and G3 is used; if none does, the arms do not run.
        settings, quick: the demo settings of a full and of a ``--quick`` run.
    """

    label: str
    size_mentions: Tuple[float, ...]
    calibrated: bool
    settings: DemoSettings
    quick: DemoSettings


# 48-pixel images, 6000 / 1000 pairs; 2 experts: the pipeline's DMU run stops being of interest after MCL stage 1
_AUDIT = replace(DEFAULT, image_size=48, num_finetune=6000, num_eval=1000, num_experts=2, route_steps=1)
_AUDIT_QUICK = replace(QUICK, image_size=48, num_experts=2, route_steps=1)
_FIVE_SEEDS = replace(_AUDIT, seeds=(0, 1, 2, 3, 4))
WORLDS = {
    "audit": ControlWorld("Replication", (), False, _AUDIT, _AUDIT_QUICK),
    "suppressed": ControlWorld("Suppressed-size control", (0.0,), False, _FIVE_SEEDS, _AUDIT_QUICK),
    "seldom": ControlWorld("Seldom-named-size control", (0.1, 0.25, 0.5), True, _FIVE_SEEDS, _AUDIT_QUICK),
}


def size_purity(labels: np.ndarray, sizes: List[str], batch_size: int) -> float:
    """Sample-weighted share of each cluster's majority size, over the clusters that give at least one batch."""
    majority, total = 0, 0
    for cluster in np.unique(labels[labels >= 0]):
        members = [sizes[i] for i in np.flatnonzero(labels == cluster)]
        if len(members) >= batch_size:
            majority += max(members.count(value) for value in ATTRIBUTES["size"])
            total += len(members)
    return majority / total if total else float("nan")


def run_control_world(out_dir: Union[str, Path], world: str, quick: bool = False) -> Dict[str, Any]:
    """Run (or resume) ``world``'s control into ``out_dir/control_{world}``; returns ``control.json``'s content."""
    if world not in WORLDS:
        raise ValueError(f"control world must be one of {sorted(WORLDS)}, got {world!r}")
    spec = WORLDS[world]
    with single_threaded():
        return _run(Path(out_dir) / f"control_{world}", spec, spec.quick if quick else spec.settings)


def _run(out_dir: Path, world: ControlWorld, settings: DemoSettings) -> Dict[str, Any]:
    step = Steps(Manifest(out_dir / "manifest.json"))
    accelerator = build_accelerator("no")
    data = step(
        "data",
        lambda: write_marker_world(
            out_dir / "data", settings.num_finetune, settings.num_eval, settings.image_size, settings.data_seed
        ),
    )
    evaluators: List[WorldEvaluator] = []  # built once, with the first base's processors

    def evaluate(model_dir: str) -> Dict[str, Any]:
        if not evaluators:
            evaluators.append(marker_world_evaluator(data, model_dir, settings.probe_train))
        metrics = evaluators[0].evaluate(load_model(model_dir))
        return {"metrics": {name: metrics[name] for name in METRICS}}

    base, train, calibration = _base(step, out_dir, world, settings, data, evaluate, accelerator)
    results: Dict[str, Any] = {"seeds": list(settings.seeds)}
    if base is None:
        results["calibration"] = calibration
        results["verdict"] = [_calibration_line(calibration) + " No size mention passed: the arms were not run."]
        return _finish(out_dir, step, results, settings)
    arms: Dict[int, Dict[str, str]] = {}
    purity: Dict[int, float] = {}
    train_sizes = [sample["size"] for sample in load_marker_samples(data["train_attributes"])]
    for seed in settings.seeds:
        seed_dir = out_dir / f"seed_{seed}"
        config = config_from_dict(run_config(seed_dir / "run", base, train, settings, seed), f"control seed {seed}")
        stages = step(f"seed_{seed}/control", functools.partial(run_method, config, "control", accelerator))["stages"]
        arms[seed] = {"cluster": stages[mcl_stage(1)]["model"], "random": stages[train_stage("control")]["model"]}
        labels = np.load(stages[cluster_stage(0)]["labels"])
        purity[seed] = size_purity(labels, train_sizes, settings.batch_size)
    base_metrics = step("eval/base", functools.partial(evaluate, str(base)))["metrics"]
    metrics: Dict[int, Dict[str, Dict[str, float]]] = {seed: {} for seed in arms}
    for seed, paths in arms.items():
        for arm, path in paths.items():
            metrics[seed][arm] = step(f"eval/seed_{seed}/{arm}", functools.partial(evaluate, path))["metrics"]
    seeds = list(settings.seeds)
    control = {arm: seed_statistics([metrics[seed][arm] for seed in seeds]) for arm in ("cluster", "random")}
    gates = {
        "base_swap_size": base_metrics["swap_size"],
        "size_suppressed": base_metrics["swap_size"] <= MAX_BASE_SWAP_SIZE,
        "size_purity": [purity[seed] for seed in seeds],
        "size_not_a_cluster_axis": all(value <= MAX_SIZE_PURITY for value in purity.values()),
    }
    if world.calibrated:
        results["calibration"] = calibration
    if world.size_mentions:  # the audit's world pre-registered no gates
        results["gates"] = gates
    results.update(
        base_trained_on=Path(train["pretrain_train"]).name,
        base=base_metrics,
        control=control,
        verdict=control_verdict(world, control, gates, base_metrics, calibration),
    )
    return _finish(out_dir, step, results, settings)


def _base(step: Steps, out_dir: Path, world: ControlWorld, settings: DemoSettings, data, evaluate, accelerator):
    """The base of the arms, the arms' ``train`` paths and the calibration record (``base`` None: none passed)."""
    calibration: List[Dict[str, Any]] = []
    if not world.size_mentions:  # the audit's world: the base reads the fine-tuning captions
        train = {"pretrain_train": data["train"], "finetune_train": data["train"]}
        trained = step("base", functools.partial(_trained_base, out_dir / "base", train, settings, accelerator))
        return Path(trained["model"]), train, calibration
    for mention in world.size_mentions:
        name = f"pretrain_mention_{mention:g}"
        write = functools.partial(
            write_marker_split, out_dir / "data", "pretrain", settings.num_pretrain, settings.image_size
        )
        pretrain = step(f"data/{name}", functools.partial(write, settings.data_seed, mention, name=name))
        train = {"pretrain_train": pretrain[name], "finetune_train": data["train"]}
        base_dir = out_dir / f"base_mention_{mention:g}"
        trained = step(base_dir.name, functools.partial(_trained_base, base_dir, train, settings, accelerator))
        if not world.calibrated:
            return Path(trained["model"]), train, calibration
        metrics = step(f"eval/{base_dir.name}", functools.partial(evaluate, trained["model"]))["metrics"]
        passed = metrics["swap_size"] <= MAX_BASE_SWAP_SIZE and metrics["probe_size"] >= MIN_BASE_PROBE_SIZE
        calibration.append({"size_mention": mention, "base": metrics, "passed": passed})
        if passed:
            return Path(trained["model"]), train, calibration
    return None, None, calibration


def _trained_base(out_dir: Path, train: Dict[str, str], settings: DemoSettings, accelerator) -> Dict[str, str]:
    return {"model": str(train_base(out_dir, train, settings, accelerator))}


def _finish(out_dir: Path, step: Steps, results: Dict[str, Any], settings: DemoSettings) -> Dict[str, Any]:
    results["settings"] = asdict(settings)
    atomic_write_json(out_dir / "control.json", results)
    timings = {name: info["seconds"] for name, info in step.manifest.stages.items() if "seconds" in info}
    atomic_write_json(out_dir / "timings.json", timings)
    return results


def _calibration_line(calibration: List[Dict[str, Any]]) -> str:
    tried = "; ".join(
        f"p={entry['size_mention']:g}: base swap_size {entry['base']['swap_size']:.1f}, probe_size "
        f"{entry['base']['probe_size']:.1f}, {'passed' if entry['passed'] else 'failed'}"
        for entry in calibration
    )
    return (
        f"Calibration (G1 base swap_size <= {MAX_BASE_SWAP_SIZE:.0f}, G3 base probe_size >= "
        f"{MIN_BASE_PROBE_SIZE:.0f}): {tried}."
    )


def control_verdict(
    world: ControlWorld,
    control: Dict[str, Any],
    gates: Dict[str, Any],
    base: Dict[str, float],
    calibration: Optional[List[Dict[str, Any]]] = None,
) -> List[str]:
    """The computed sentences: one per metric and, where the world has gates, the pre-registered outcome."""
    num_seeds = len(control["cluster"]["swap_size"]["per_seed"])
    lines = [_calibration_line(calibration)] if calibration else []
    for metric in METRICS:
        cluster, random = control["cluster"][metric], control["random"][metric]
        lines.append(
            f"{world.label}, {metric}: one-cluster batches {cluster['mean']:.1f} ± {cluster['std']:.1f} vs random "
            f"batches {random['mean']:.1f} ± {random['std']:.1f} ({cluster['mean'] - random['mean']:+.1f} points, "
            f"{compare(cluster, random, num_seeds)})."
        )
    if not world.size_mentions:
        return lines
    purities = ", ".join(f"{value:.2f}" for value in gates["size_purity"])
    lines.append(
        f"Gate G1 (base swap_size <= {MAX_BASE_SWAP_SIZE:.0f}): {gates['base_swap_size']:.1f}, "
        f"{'passed' if gates['size_suppressed'] else 'failed'}. Gate G2 (stage-1 size purity <= "
        f"{MAX_SIZE_PURITY:.2f} for every seed): {purities}, "
        f"{'passed' if gates['size_not_a_cluster_axis'] else 'failed'}."
    )
    swap = {arm: control[arm]["swap_size"] for arm in ("cluster", "random")}
    if not (gates["size_suppressed"] and gates["size_not_a_cluster_axis"]):
        outcome = "a gate failed: not a test of the mechanism"
    elif max(entry["mean"] for entry in swap.values()) <= base["swap_size"] + LEARNED_MARGIN:
        outcome = "size not learnable by one FFN-only stage at this budget (neither arm 5 points above the base)"
    elif compare(swap["cluster"], swap["random"], num_seeds) == "significant gain":
        outcome = "the cluster-batch gain on the suppressed attribute is shown"
    else:
        outcome = "the cluster-batch gain on the suppressed attribute is not shown"
    lines.append(f"Outcome (pre-registered rule): {outcome}.")
    return lines
