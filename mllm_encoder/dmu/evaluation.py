"""The ``eval`` stage: zero-shot retrieval, per-attribute accuracy and router load of one checkpoint."""

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from mllm_encoder.atomic import PathLike, atomic_write_json
from mllm_encoder.data import ImageTextCollator, load_image_text_dataset
from mllm_encoder.dmu.config import EvalSection
from mllm_encoder.dmu.resources import load_model, processors
from mllm_encoder.eval.classification import per_attribute_accuracy
from mllm_encoder.eval.retrieval import evaluate_retrieval
from mllm_encoder.eval.router_analysis import expert_load, plot_expert_load

logger = logging.getLogger(__name__)


def _is_moe(model: torch.nn.Module) -> bool:
    config = model.config
    return any(getattr(tower, "num_experts", 1) > 1 for tower in (config.vision_config, config.text_config))


def metrics_path(out_dir: PathLike) -> Path:
    """Where :func:`evaluate_checkpoint` writes the metrics of ``out_dir``'s evaluation."""
    return Path(out_dir) / "metrics.json"


def evaluate_checkpoint(
    model_dir: PathLike, section: EvalSection, accelerator, out_dir: PathLike, processors_dir: Optional[PathLike] = None
) -> Dict[str, Any]:
    """Evaluate on the main process; writes ``metrics.json`` (and ``expert_load.{json,png}`` for an MoE).

    Metrics (percent): ``i2t_r1/5/10``, ``t2i_r1/5/10`` on ``section.data``; ``acc_{attribute}`` and
    ``acc_mean`` when ``section.attributes`` (a synthetic attributes file) is given. Without
    ``section.data`` nothing is measured. Images and captions are preprocessed with the processors of
    ``processors_dir`` (default: ``model_dir``'s own).
    """
    metrics: Dict[str, Any] = {}
    if accelerator.is_main_process and section.data is not None:
        metrics = _evaluate(
            Path(model_dir), Path(processors_dir or model_dir), section, accelerator.device, Path(out_dir)
        )
        atomic_write_json(metrics_path(out_dir), metrics)
        logger.info("%s: %s", model_dir, {k: round(v, 4) for k, v in metrics.items()})
    accelerator.wait_for_everyone()
    return metrics


@torch.no_grad()
def _evaluate(model_dir: Path, processors_dir: Path, section: EvalSection, device, out_dir: Path) -> Dict[str, float]:
    model = load_model(model_dir).to(device).eval()
    image_processor, tokenizer = processors(processors_dir)
    retrieval = evaluate_retrieval(
        model,
        section.data,
        image_processor,
        tokenizer,
        format=section.format,
        split=section.split,
        image_root=section.image_root,
        batch_size=section.batch_size,
    )
    metrics = {key: value for key, value in retrieval.items() if key.startswith(("i2t_", "t2i_"))}
    if section.attributes:
        accuracy = per_attribute_accuracy(
            model, image_processor, tokenizer, section.attributes, batch_size=section.batch_size
        )
        metrics.update({f"acc_{name}": value for name, value in accuracy.items()})
    if _is_moe(model):
        _write_expert_load(model, section, image_processor, tokenizer, out_dir)
    return metrics


def _write_expert_load(model, section: EvalSection, image_processor, tokenizer, out_dir: Path) -> None:
    dataset = load_image_text_dataset(section.data, section.format, section.image_root, image_processor, tokenizer)
    loader = torch.utils.data.DataLoader(dataset, batch_size=section.batch_size, collate_fn=ImageTextCollator(1.0))
    load = expert_load(model, loader, progress=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "expert_load.json", load)
    plot_expert_load(load, out_dir / "expert_load.png", title=out_dir.parent.name)  # the method: dmu, upcycle


def _metric_columns(results: Dict[str, Dict[str, float]]) -> List[str]:
    """Retrieval R@1 both ways, then every per-attribute accuracy (``acc_mean`` last)."""
    keys = {key for metrics in results.values() for key in metrics}
    attributes = sorted(key for key in keys if key.startswith("acc_") and key != "acc_mean")
    return [*[k for k in ("i2t_r1", "t2i_r1") if k in keys], *attributes, *(["acc_mean"] if "acc_mean" in keys else [])]


def format_results_table(results: Dict[str, Dict[str, float]]) -> str:
    """``clip-moe dmu run``'s table: one row per method, one column per metric (percent), best in bold."""
    columns = _metric_columns(results)
    names = [c.replace("_r1", " R@1").replace("acc_", "") for c in columns]
    lines = ["| method | " + " | ".join(names) + " |", "|---|" + "---:|" * len(columns)]
    best = {c: max(m.get(c, float("-inf")) for m in results.values()) for c in columns}
    for method, metrics in results.items():
        cells = [f"**{metrics[c]:.1f}**" if metrics[c] == best[c] else f"{metrics[c]:.1f}" for c in columns]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
