"""``clip-moe demo --replication``: the audit's stage-level control, replicated in the audit's world.

Pre-registered in ``docs/dmu.md`` ("Control replication"): the world of :mod:`mllm_encoder.data.marker_world`;
a base trained with the demo's recipe on its captions; per seed, MCL stage 1 of the pipeline (one-cluster
batches) against the same stage on random batches (the demo's control), equal steps; caption-swap accuracy on
the disc's size and R@1 both ways on the held-out pairs. Reuses the demo's base, run config, control and steps.
"""

import functools
import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Dict, Union

import torch

from mllm_encoder.atomic import PathLike, atomic_write_json
from mllm_encoder.data.marker_world import ATTRIBUTES, marker_caption, write_marker_world
from mllm_encoder.dmu.accelerator import build_accelerator
from mllm_encoder.dmu.benchmark import Encoder
from mllm_encoder.dmu.config import config_from_dict
from mllm_encoder.dmu.demo import (
    DEFAULT,
    QUICK,
    DemoSettings,
    _control_random,
    _run_method,
    _single_threaded,
    _Steps,
    _train_base,
    run_config,
)
from mllm_encoder.dmu.report import compare, seed_statistics
from mllm_encoder.dmu.resources import load_model
from mllm_encoder.dmu.run_state import Manifest
from mllm_encoder.eval.caption_swap import caption_swap_accuracy
from mllm_encoder.eval.retrieval import eval_mode, retrieval_metrics

# 48-pixel images, 6000 / 1000 pairs; 2 experts: the pipeline's DMU run stops being of interest after MCL stage 1
REPLICATION = replace(DEFAULT, image_size=48, num_finetune=6000, num_eval=1000, num_experts=2, route_steps=1)
REPLICATION_QUICK = replace(QUICK, image_size=48, num_experts=2, route_steps=1)
METRICS = ("swap_size", "i2t_r1", "t2i_r1")


class MarkerEvaluator(Encoder):
    """``swap_size``, ``i2t_r1`` and ``t2i_r1`` (percent) on the marker world's held-out pairs."""

    def __init__(self, paths: Dict[str, str], processors_dir: PathLike):
        super().__init__(processors_dir)
        samples = json.loads(Path(paths["eval_attributes"]).read_text(encoding="utf-8"))["samples"]
        sizes = ATTRIBUTES["size"]
        self.pixels["eval"] = self._load_images(Path(paths["image_root"]), samples)
        self.tokens = self.text_tokenizer([marker_caption(s) for s in samples])
        self.swap_tokens = self.text_tokenizer([marker_caption({**s, "size": v}) for s in samples for v in sizes])
        self.swap_labels = torch.tensor([sizes.index(s["size"]) for s in samples])

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> Dict[str, float]:
        with eval_mode(model):
            images = self._images(model, "eval")
            ranks = retrieval_metrics(images, self._texts(model, self.tokens), torch.arange(len(images)), ks=(1,))
            options = self._texts(model, self.swap_tokens).view(len(images), len(ATTRIBUTES["size"]), -1)
            swap = caption_swap_accuracy(images, options, self.swap_labels)
        return {"swap_size": swap, "i2t_r1": ranks["i2t_r1"], "t2i_r1": ranks["t2i_r1"]}


def run_replication(out_dir: Union[str, Path], quick: bool = False) -> Dict[str, Any]:
    """Run (or resume) the replication into ``out_dir/replication``; returns ``replication.json``'s content."""
    with _single_threaded():
        return _run(Path(out_dir) / "replication", REPLICATION_QUICK if quick else REPLICATION)


def _run(out_dir: Path, settings: DemoSettings) -> Dict[str, Any]:
    step = _Steps(Manifest(out_dir / "manifest.json"))
    accelerator = build_accelerator("no")
    data = step(
        "data",
        lambda: write_marker_world(
            out_dir / "data", settings.num_finetune, settings.num_eval, settings.image_size, settings.data_seed
        ),
    )
    train = {"pretrain_train": data["train"], "finetune_train": data["train"]}  # one distribution for both
    base = Path(
        step("base", lambda: {"model": str(_train_base(out_dir / "base", train, settings, accelerator))})["model"]
    )
    arms: Dict[int, Dict[str, str]] = {}
    for seed in settings.seeds:
        seed_dir = out_dir / f"seed_{seed}"
        config = config_from_dict(run_config(seed_dir / "run", base, train, settings, seed), f"replication seed {seed}")
        stages = step(f"seed_{seed}/cluster", functools.partial(_run_method, config, "dmu", accelerator))["stages"]
        control = step(f"seed_{seed}/random", functools.partial(_control_random, config, seed_dir, accelerator))
        arms[seed] = {"cluster": stages["dmu/mcl_1"]["model"], "random": control["model"]}
    evaluator = MarkerEvaluator(data, base)

    def evaluate(model_dir: str) -> Dict[str, Any]:
        return {"metrics": evaluator.evaluate(load_model(model_dir))}

    metrics: Dict[int, Dict[str, Dict[str, float]]] = {seed: {} for seed in arms}
    for seed, paths in arms.items():
        for arm, path in paths.items():
            metrics[seed][arm] = step(f"eval/seed_{seed}/{arm}", functools.partial(evaluate, path))["metrics"]
    seeds = list(settings.seeds)
    control = {arm: seed_statistics([metrics[seed][arm] for seed in seeds]) for arm in ("cluster", "random")}
    lines = []
    for metric in METRICS:
        cluster, random = control["cluster"][metric], control["random"][metric]
        lines.append(
            f"Replication, {metric}: one-cluster batches {cluster['mean']:.1f} ± {cluster['std']:.1f} vs random "
            f"batches {random['mean']:.1f} ± {random['std']:.1f} ({cluster['mean'] - random['mean']:+.1f} points, "
            f"{compare(cluster, random, len(seeds))})."
        )
    results = {"seeds": seeds, "control": control, "verdict": lines, "settings": asdict(settings)}
    atomic_write_json(out_dir / "replication.json", results)
    timings = {name: info["seconds"] for name, info in step.manifest.stages.items() if "seconds" in info}
    atomic_write_json(out_dir / "timings.json", timings)
    return results
