"""``clip-moe demo``: does DMU do what the paper claims, at CPU scale? (design: ``docs/dmu.md``).

1. write the synthetic world (:mod:`mllm_encoder.experiments.synthetic_world`): a pretraining distribution for the
   base and a fine-tuning distribution whose captions name three hidden attributes the base's seldom mention;
2. train a tiny CLIP from scratch on the pretraining distribution: the dense base, shared by every seed;
3. for every seed, on the fine-tuning distribution: DMU (3 MCL stages + router tuning), direct fine-tuning
   and sparse upcycling at equal optimizer steps (``clip-moe dmu run``), and the stage-level control (MCL
   stage 1's recipe on random batches);
4. evaluate every model and every expert alone (:mod:`mllm_encoder.experiments.evaluator`); write ``results.json``
   (mean, std, per seed), ``report.md`` (verdict computed from the numbers, plots), ``timings.json`` and the
   final CLIP-MoE checkpoint (``clip-moe/``, seed 0's DMU model, loadable with ``AutoModel.from_pretrained``).

Every step is recorded in the demo's manifest, so an interrupted demo resumes where it stopped.
"""

import contextlib
import functools
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
from tqdm.auto import tqdm

from mllm_encoder.atomic import atomic_directory, atomic_write_json
from mllm_encoder.dmu.accelerator import build_accelerator
from mllm_encoder.dmu.config import METHODS, DataSection, RuntimeSection, StageSection, config_from_dict
from mllm_encoder.dmu.pipeline import ROUTE_STAGE, mcl_stage, run_pipeline, train_stage
from mllm_encoder.dmu.resources import load_model
from mllm_encoder.dmu.run_state import Manifest
from mllm_encoder.dmu.stages import run_training, train_config
from mllm_encoder.experiments.evaluator import WorldEvaluator, demo_world_evaluator
from mllm_encoder.experiments.report import aggregate_results, write_report
from mllm_encoder.experiments.synthetic_world import write_world_dataset

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSettings:
    """Sizes and schedule of the demo (``QUICK`` for tests, ``DEFAULT`` for ``make demo``)."""

    seeds: Tuple[int, ...] = (0, 1, 2)
    num_pretrain: int = 6000
    num_finetune: int = 6000
    num_eval: int = 500
    probe_train: int = 1000
    image_size: int = 32
    patch_size: int = 8
    width: int = 64
    layers: int = 2
    context_length: int = 32
    data_seed: int = 0
    base_steps: int = 600
    base_batch_size: int = 64
    base_lr: float = 2e-3
    temperature: float = 0.07
    batch_size: int = 32
    mcl_steps: int = 100
    mcl_lr: float = 1e-3
    route_steps: int = 30
    route_lr: float = 1e-3
    num_experts: int = 4
    top_k: int = 2
    # One k-means fit per clustering: the setting the committed demo results (docs/demo/) were measured with,
    # before dmu.kmeans_restarts (default 4) existed; with 4 a later fit has lower inertia in some stage, the
    # clusters differ and so do the numbers.
    kmeans_restarts: int = 1


DEFAULT = DemoSettings()
QUICK = DemoSettings(
    seeds=(0,),
    num_pretrain=256,
    num_finetune=256,
    num_eval=64,
    probe_train=64,
    width=32,
    base_steps=8,
    base_batch_size=32,
    batch_size=16,
    mcl_steps=3,
    route_steps=2,
    num_experts=3,
)


def _model_config(settings: DemoSettings):
    from mllm_encoder import CLIPMoEConfig

    tower = dict(
        hidden_size=settings.width,
        intermediate_size=4 * settings.width,
        num_hidden_layers=settings.layers,
        num_attention_heads=4,
    )
    return CLIPMoEConfig(
        vision_config=dict(image_size=settings.image_size, patch_size=settings.patch_size, **tower),
        text_config=dict(
            vocab_size=49408, max_position_embeddings=settings.context_length, eos_token_id=49407, **tower
        ),
        projection_dim=settings.width,
    )


def _write_untrained_base(out_dir: Path, settings: DemoSettings) -> Path:
    from mllm_encoder import CLIPMoEModel
    from mllm_encoder.checkpoint import default_image_processor, save_checkpoint
    from mllm_encoder.conversion.tokenizer import write_clip_tokenizer

    tokenizer = write_clip_tokenizer(out_dir / "tokenizer", context_length=settings.context_length)
    torch.manual_seed(settings.data_seed)
    model = CLIPMoEModel(_model_config(settings))
    return save_checkpoint(
        model, out_dir / "init", default_image_processor(settings.image_size), tokenizer, overwrite=True
    )


def train_base(out_dir: Path, data: Dict[str, str], settings: DemoSettings, accelerator) -> Path:
    """A tiny CLIP trained from scratch on the pretraining distribution: the dense base of every method."""
    from mllm_encoder import CLIPMoEModel

    init = _write_untrained_base(out_dir, settings)
    section = StageSection(
        batch_size=settings.base_batch_size,
        lr=settings.base_lr,
        weight_decay=0.1,
        warmup_steps=settings.base_steps // 10,
        trainable="all",
        temperature=settings.temperature,
    )
    cfg = train_config(section, RuntimeSection(save_every=100, log_every=50), settings.base_steps, settings.data_seed)
    model = CLIPMoEModel.from_pretrained(str(init))
    model_dir, _ = run_training(
        model,
        DataSection(train=data["pretrain_train"]),
        init,
        None,
        cfg,
        out_dir / "train",
        accelerator,
        desc="base (pretraining distribution)",
    )
    return model_dir


def run_config(run_dir: Path, base_dir: Path, data: Dict[str, str], settings: DemoSettings, seed: int) -> Dict:
    """The ``clip-moe dmu run`` config of one seed (also written to ``run_dir/../run_config.json``).

    The pipeline's own evaluation is off (no ``eval.data``): the demo evaluates every model itself.
    """
    stage = dict(
        steps=settings.mcl_steps,
        batch_size=settings.batch_size,
        lr=settings.mcl_lr,
        warmup_steps=max(1, settings.mcl_steps // 10),
        temperature=settings.temperature,  # the base's own fixed temperature (0.01 is OpenAI CLIP's)
    )
    return {
        "base_model": str(base_dir),
        "run_dir": str(run_dir),
        "seed": seed,
        "data": {"train": data["finetune_train"]},
        "dmu": {
            "num_experts": settings.num_experts,
            "top_k": settings.top_k,
            "kmeans_restarts": settings.kmeans_restarts,
        },
        "mcl": stage,
        "route": {
            **stage,
            "steps": settings.route_steps,
            "lr": settings.route_lr,
            "warmup_steps": max(1, settings.route_steps // 10),
            "weight_decay": 0.01,
            "trainable": "router",
            "aux_loss_coef": 0.01,
        },
        "baseline": {key: value for key, value in stage.items() if key != "steps"},  # steps: DMU's total
        "runtime": {"save_every": 50, "log_every": 25, "mixed_precision": "no"},
    }


def run_method(config, method: str, accelerator) -> Dict[str, Any]:
    """One method through the resumable pipeline; returns the run manifest's stages so far."""
    return {"stages": run_pipeline(config, method, accelerator)}


class Steps:
    """Runs the demo's steps once each, recording their results and wall time in the manifest."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest

    def __call__(self, name: str, run: Callable[[], Dict[str, Any]]) -> Dict[str, Any]:
        if not self.manifest.is_done(name):
            logger.info("demo: %s", name)
            start = time.perf_counter()
            result = run()
            self.manifest.mark_done(name, **result, seconds=round(time.perf_counter() - start, 2))
        return self.manifest.result(name)


def _models_of_seed(stages: Dict[str, Any], num_experts: int) -> Dict[str, str]:
    """``{name: model directory}`` of one seed (its run manifest's ``stages``): the methods, each MCL expert
    alone and the control's random arm."""
    models = {"finetune": stages[train_stage("finetune")]["model"], "upcycle": stages[train_stage("upcycle")]["model"]}
    models["dmu"] = stages[ROUTE_STAGE]["model"]
    models.update({f"expert_{s}": stages[mcl_stage(s)]["model"] for s in range(1, num_experts)})
    models["control_random"] = stages[train_stage("control")]["model"]
    return models


def loss_histories(stages: Dict[str, Any], num_experts: int) -> Dict[str, str]:
    """``{curve label: history.json}`` of every training stage of one seed, from its run manifest's ``stages``
    (what the report's loss plot draws; a manifest written before stages recorded their history has none)."""
    names = {f"MCL stage {s}": mcl_stage(s) for s in range(1, num_experts)}
    names.update(
        {
            "router tuning": ROUTE_STAGE,
            "control (random batches)": train_stage("control"),
            "direct fine-tuning": train_stage("finetune"),
            "sparse upcycling": train_stage("upcycle"),
        }
    )
    return {label: stages[name]["history"] for label, name in names.items() if "history" in stages[name]}


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Torch on one thread for the block: a width-64 model gains nothing from intra-op threads, and on a shared
    2-core machine two-thread processes spin-wait (the base trained 10x slower under load, measured)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_demo(out_dir: Union[str, Path], quick: bool = False, settings: Optional[DemoSettings] = None) -> Dict:
    """Run (or resume) the whole demo into ``out_dir``; returns ``results.json``'s content."""
    with single_threaded():
        return _run_demo(Path(out_dir), settings or (QUICK if quick else DEFAULT))


def _run_demo(out_dir: Path, settings: DemoSettings) -> Dict:
    manifest = out_dir / "demo_manifest.json"
    published = out_dir / "clip-moe"
    if published.exists() and not manifest.exists():  # a demo directory (with its manifest) is ours
        raise ValueError(
            f"{published}: exists and was not written by this demo; refusing to replace it (choose another --out)"
        )
    step = Steps(Manifest(manifest))
    accelerator = build_accelerator("no")
    data = step(
        "data",
        lambda: write_world_dataset(
            out_dir / "data",
            settings.num_pretrain,
            settings.num_finetune,
            settings.num_eval,
            settings.image_size,
            settings.data_seed,
        ),
    )
    base = Path(
        step("base", lambda: {"model": str(train_base(out_dir / "base", data, settings, accelerator))})["model"]
    )
    models: Dict[int, Dict[str, str]] = {}
    histories: Dict[str, str] = {}
    for seed in settings.seeds:
        seed_dir = out_dir / f"seed_{seed}"
        values = run_config(seed_dir / "run", base, data, settings, seed)
        atomic_write_json(seed_dir / "run_config.json", values)
        config = config_from_dict(values, f"demo config (seed {seed})")
        for method in METHODS:
            stages = step(f"seed_{seed}/{method}", functools.partial(run_method, config, method, accelerator))
        models[seed] = _models_of_seed(stages["stages"], settings.num_experts)
        histories = histories or loss_histories(stages["stages"], settings.num_experts)  # the first seed's
    metrics, loads = _evaluate_all(step, data, base, models, settings)
    results = aggregate_results(list(settings.seeds), metrics, settings.num_experts)
    results["router_load"] = loads
    results["settings"] = asdict(settings)
    atomic_write_json(out_dir / "results.json", results)
    timings = {name: info["seconds"] for name, info in step.manifest.stages.items() if "seconds" in info}
    atomic_write_json(out_dir / "timings.json", timings)
    step("publish", lambda: _publish_checkpoint(Path(models[settings.seeds[0]]["dmu"]), published))
    write_report(out_dir, results, timings, histories)
    return results


def _evaluate_all(step: Steps, data, base: Path, models: Dict[int, Dict[str, str]], settings: DemoSettings):
    """Metrics of the base (once) and of every model of every seed: ``({seed: {name: metrics}}, loads)``."""
    evaluator: List[WorldEvaluator] = []  # built only when something is left to evaluate

    def evaluate(model_dir: str, with_load: bool = False) -> Callable[[], Dict[str, Any]]:
        def run() -> Dict[str, Any]:
            if not evaluator:
                evaluator.append(demo_world_evaluator(data, base, settings.probe_train))
            model = load_model(model_dir)
            result = {"metrics": evaluator[0].evaluate(model)}
            if with_load:
                result["router_load"] = evaluator[0].expert_load(model)
            return result

        return run

    names = [(seed, name) for seed, seed_models in models.items() for name in seed_models]
    base_metrics = step("eval/base", evaluate(str(base)))["metrics"]
    metrics: Dict[int, Dict[str, Dict[str, float]]] = {seed: {"base": base_metrics} for seed in models}
    loads = {}
    for seed, name in tqdm(names, desc="evaluating", leave=False):
        result = step(f"eval/seed_{seed}/{name}", evaluate(models[seed][name], with_load=name == "dmu"))
        metrics[seed][name] = result["metrics"]
        if "router_load" in result:
            loads[f"seed_{seed}"] = result["router_load"]
    return metrics, loads


def _publish_checkpoint(source: Path, target: Path) -> Dict[str, str]:
    """Copy seed 0's DMU model to ``target`` (checked at the demo's start to be absent or the demo's own)."""
    with atomic_directory(target, overwrite=True) as staging:
        shutil.copytree(source, staging, dirs_exist_ok=True)
    return {"checkpoint": str(target)}
