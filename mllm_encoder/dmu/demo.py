"""``clip-moe demo``: DMU against direct fine-tuning and sparse upcycling on synthetic fine-grained shapes.

1. write the synthetic shapes set (ShareGPT4V JSON, train + held-out eval);
2. train a tiny CLIP from scratch for a short while as the dense base (the real CLIP tokenizer, a small ViT);
3. run DMU (4 experts, top-2) and both baselines at equal training steps through ``clip-moe dmu run``;
4. evaluate everything on the held-out split; write ``results.json``, ``report.md`` with plots and the
   final CLIP-MoE checkpoint (``clip-moe/``, loadable with ``AutoModel.from_pretrained``).

Every step is recorded in the demo's manifest, so an interrupted demo resumes where it stopped.
"""

import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from mllm_encoder.atomic import atomic_write_json
from mllm_encoder.dmu.accelerator import build_accelerator
from mllm_encoder.dmu.config import DataSection, RuntimeSection, StageSection, config_from_dict
from mllm_encoder.dmu.pipeline import collect_results, run_pipeline
from mllm_encoder.dmu.run_state import Manifest
from mllm_encoder.dmu.stages import run_training, train_config

logger = logging.getLogger(__name__)
METHOD_ORDER = ("base", "finetune", "upcycle", "dmu")


@dataclass(frozen=True)
class DemoSettings:
    """Sizes and schedule of the demo (``QUICK`` for tests, ``DEFAULT`` for ``make demo``)."""

    num_train: int = 2000
    num_eval: int = 400
    image_size: int = 48
    patch_size: int = 8
    width: int = 64
    layers: int = 2
    context_length: int = 32
    base_steps: int = 400
    base_lr: float = 2e-3
    base_temperature: float = 0.07
    batch_size: int = 64
    mcl_steps: int = 40
    mcl_lr: float = 5e-4
    route_steps: int = 20
    route_lr: float = 1e-3
    num_experts: int = 4
    top_k: int = 2
    seed: int = 0


DEFAULT = DemoSettings()
QUICK = DemoSettings(
    num_train=160, num_eval=48, image_size=32, width=32, base_steps=6, batch_size=16, mcl_steps=2, route_steps=2
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
    torch.manual_seed(settings.seed)
    model = CLIPMoEModel(_model_config(settings))
    return save_checkpoint(model, out_dir / "init", default_image_processor(settings.image_size), tokenizer)


def _train_base(out_dir: Path, data: Dict[str, str], settings: DemoSettings, accelerator) -> Path:
    """A tiny CLIP trained from scratch, briefly: the dense base every method starts from."""
    from mllm_encoder import CLIPMoEModel

    init = _write_untrained_base(out_dir, settings)
    section = StageSection(
        batch_size=settings.batch_size,
        lr=settings.base_lr,
        weight_decay=0.1,
        warmup_steps=settings.base_steps // 10,
        trainable="all",
        temperature=settings.base_temperature,
    )
    cfg = train_config(section, RuntimeSection(save_every=50, log_every=25), settings.base_steps, settings.seed)
    model = CLIPMoEModel.from_pretrained(str(init))
    model_dir, _ = run_training(
        model,
        DataSection(train=data["train"]),
        init,
        None,
        cfg,
        out_dir / "train",
        accelerator,
        desc="base (from scratch)",
    )
    return model_dir


def run_config(out_dir: Path, base_dir: Path, data: Dict[str, str], settings: DemoSettings) -> Dict[str, Any]:
    """The ``clip-moe dmu run`` config of the demo (also written to ``run_config.yaml``)."""
    stage = dict(
        steps=settings.mcl_steps,
        batch_size=settings.batch_size,
        lr=settings.mcl_lr,
        warmup_steps=max(1, settings.mcl_steps // 10),
        temperature=settings.base_temperature,  # the base's own (fixed) temperature, as 0.01 is OpenAI CLIP's
    )
    return {
        "base_model": str(base_dir),
        "run_dir": str(out_dir / "run"),
        "seed": settings.seed,
        "data": {"train": data["train"]},
        "eval": {"data": data["eval"], "attributes": data["eval_attributes"], "batch_size": 250},
        "dmu": {"num_experts": settings.num_experts, "top_k": settings.top_k, "kmeans_backend": "sklearn"},
        "mcl": stage,
        "route": {
            **stage,
            "steps": settings.route_steps,
            "lr": settings.route_lr,
            "weight_decay": 0.01,
            "trainable": "router",
            "aux_loss_coef": 0.01,
        },
        "baseline": {key: value for key, value in stage.items() if key != "steps"},  # steps: DMU's total
        "runtime": {"save_every": 50, "log_every": 25, "mixed_precision": "no"},
    }


def run_demo(
    out_dir: Union[str, Path], quick: bool = False, settings: Optional[DemoSettings] = None
) -> Dict[str, Dict[str, float]]:
    """Run (or resume) the whole demo into ``out_dir``; returns ``results.json``'s content."""
    from mllm_encoder.data.synthetic import write_shapes_dataset
    from mllm_encoder.dmu.report import write_report

    settings = settings or (QUICK if quick else DEFAULT)
    out_dir = Path(out_dir)
    manifest = Manifest(out_dir / "demo_manifest.json")
    accelerator = build_accelerator("no")
    if not manifest.is_done("data"):
        manifest.mark_done(
            "data",
            **write_shapes_dataset(
                out_dir / "data", settings.num_train, settings.num_eval, settings.image_size, settings.seed
            ),
        )
    data = manifest.result("data")
    if not manifest.is_done("base"):
        manifest.mark_done("base", model=str(_train_base(out_dir / "base", data, settings, accelerator)))
    values = run_config(out_dir, Path(manifest.result("base")["model"]), data, settings)
    atomic_write_json(out_dir / "run_config.json", values)
    config = config_from_dict(values, "demo config")
    for method in ("dmu", "finetune", "upcycle"):
        stages = run_pipeline(config, method, accelerator)
    results = collect_results(Manifest(Path(config.run_dir) / "manifest.json"))
    results = {method: results[method] for method in METHOD_ORDER if method in results}
    atomic_write_json(out_dir / "results.json", results)
    _publish_checkpoint(Path(stages["dmu/route"]["model"]), out_dir / "clip-moe")
    write_report(out_dir, results, asdict(settings))
    return results


def _publish_checkpoint(source: Path, target: Path) -> None:
    from mllm_encoder.atomic import atomic_directory

    with atomic_directory(target) as staging:
        shutil.copytree(source, staging, dirs_exist_ok=True)
