"""The ``eval`` stage: zero-shot retrieval, per-attribute accuracy and router load of one checkpoint."""

import logging
from pathlib import Path
from typing import Any, Dict, Union

import torch

from mllm_encoder.dmu.config import DataSection, EvalSection
from mllm_encoder.dmu.run_state import write_json_atomic

logger = logging.getLogger(__name__)


def _is_moe(model: torch.nn.Module) -> bool:
    config = model.config
    return any(getattr(tower, "num_experts", 1) > 1 for tower in (config.vision_config, config.text_config))


def evaluate_checkpoint(model_dir: Union[str, Path], section: EvalSection, accelerator, out_dir: Union[str, Path]) -> Dict[str, Any]:
    """Evaluate on the main process; writes ``metrics.json`` (and ``expert_load.{json,png}`` for an MoE).

    Metrics: ``i2t_r1/5/10``, ``t2i_r1/5/10`` on ``section.data``; ``acc_{attribute}`` and ``acc_mean`` when
    ``section.attributes`` (a synthetic attributes file) is given. Without ``section.data`` nothing is measured.
    """
    metrics: Dict[str, Any] = {}
    if accelerator.is_main_process and section.data is not None:
        metrics = _evaluate(Path(model_dir), section, accelerator.device, Path(out_dir))
        write_json_atomic(Path(out_dir) / "metrics.json", metrics)
        logger.info("%s: %s", model_dir, {k: round(v, 4) for k, v in metrics.items()})
    accelerator.wait_for_everyone()
    return metrics


@torch.no_grad()
def _evaluate(model_dir: Path, section: EvalSection, device, out_dir: Path) -> Dict[str, float]:
    from mllm_encoder.dmu.stages import load_model, load_training_data
    from mllm_encoder.eval.retrieval import evaluate_retrieval

    model = load_model(model_dir).to(device).eval()
    data = DataSection(train=section.data, format=section.format, image_root=section.image_root, max_bad_fraction=1.0)
    dataset, collator = load_training_data(data, model_dir)
    metrics = dict(evaluate_retrieval(model, dataset, collator=collator, batch_size=section.batch_size, device=device))
    if section.attributes:
        from mllm_encoder.eval.classification import per_attribute_accuracy

        metrics.update(per_attribute_accuracy(model, dataset, section.attributes, model_dir, batch_size=section.batch_size, device=device))
    if _is_moe(model):
        from mllm_encoder.eval.router_analysis import expert_load, plot_expert_load

        load = expert_load(model, dataset, collator=collator, batch_size=section.batch_size, device=device)
        out_dir.mkdir(parents=True, exist_ok=True)
        plot_expert_load(load, out_dir / "expert_load.png")
    return metrics
