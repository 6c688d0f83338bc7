"""Router analysis: the fraction of token slots each expert receives, per tower and MoE layer."""

import logging
import os
from typing import Any, Dict, Iterable, List, Optional, Union

import torch
from tqdm.auto import tqdm

from mllm_encoder.encode import eval_mode, model_device
from mllm_encoder.moe.router import route
from mllm_encoder.towers import TEXT, TOWERS, VISION

logger = logging.getLogger(__name__)


def routing_counts(router_logits: torch.Tensor, top_k: int, token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[E]`` counts of the top-``top_k`` (of the softmax) selections over the (unmasked) tokens."""
    logits = router_logits.reshape(-1, router_logits.shape[-1]).float()
    if token_mask is not None and token_mask.numel() == logits.shape[0]:
        logits = logits[token_mask.reshape(-1).to(logits.device).bool()]
    _, _, chosen = route(logits, top_k)
    return torch.bincount(chosen.reshape(-1).cpu(), minlength=logits.shape[-1]).double()


def _tower_config(tower: Any) -> Any:
    config = getattr(tower, "config", None)
    if config is None or getattr(config, "num_experts", 1) <= 1:
        return None
    return config


def _moe_layers(config: Any) -> List[int]:
    layers = getattr(config, "moe_layer_indices", None)
    if layers is None:
        layers = config.moe_layers if config.moe_layers is not None else range(config.num_hidden_layers)
    return list(layers)


def _run_tower(name: str, tower: Any, batch: Dict[str, torch.Tensor], device, dtype):
    if name == VISION.name:
        output = tower(batch[VISION.input_name].to(device=device, dtype=dtype))
        return output.router_logits, None
    mask = batch.get("attention_mask")
    mask = mask.to(device) if mask is not None else None
    return tower(batch[TEXT.input_name].to(device), mask).router_logits, mask


def _moe_towers(model: Any) -> Dict[str, Any]:
    towers = {tower.name: getattr(model, tower.module, None) for tower in TOWERS}
    towers = {name: tower for name, tower in towers.items() if tower is not None and _tower_config(tower)}
    if not towers:
        raise ValueError("the model has no MoE layers to analyse")
    return towers


@torch.no_grad()
def expert_load(model: Any, loader: Iterable, max_batches: Optional[int] = None, progress: bool = True) -> Dict:
    """Per tower (``vision``/``text``) and MoE layer, the fraction of token slots routed to each expert.

    Runs each tower of a CLIP-MoE model (or a single-tower model) on the loader's batches (``pixel_values``
    and/or ``input_ids``/``attention_mask``; padding tokens are excluded) and counts the top-k experts of
    the router softmax. Returns ``{tower: {"layers", "load" ([layer][expert] fractions summing to 1),
    "num_experts", "top_k", "num_tokens"}}``. Dense towers are left out.
    """
    towers = _moe_towers(model)
    inputs = {tower.name: tower.input_name for tower in TOWERS}
    counts: Dict[str, torch.Tensor] = {}
    device, dtype = model_device(model), next(model.parameters()).dtype
    with eval_mode(model):
        for step, batch in enumerate(tqdm(loader, desc="router load", disable=not progress, leave=False)):
            if max_batches is not None and step >= max_batches:
                break
            for name, tower in towers.items():
                if batch is None or inputs[name] not in batch:
                    continue
                logits, mask = _run_tower(name, tower, batch, device, dtype)
                layer_counts = torch.stack([routing_counts(layer, tower.config.top_k, mask) for layer in logits])
                counts[name] = counts[name] + layer_counts if name in counts else layer_counts
    return {name: _load_entry(towers[name].config, tower_counts) for name, tower_counts in counts.items()}


def _load_entry(config: Any, counts: torch.Tensor) -> Dict[str, Any]:
    load = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    num_tokens = int(counts[0].sum().item()) // int(config.top_k)
    return {
        "layers": _moe_layers(config),
        "load": load.tolist(),
        "num_experts": int(config.num_experts),
        "top_k": int(config.top_k),
        "num_tokens": num_tokens,
    }


def format_load_table(load: Dict[str, Dict[str, Any]]) -> str:
    """A Markdown table: one row per tower and layer, one column per expert (percent of token slots)."""
    num_experts = max(entry["num_experts"] for entry in load.values())
    lines = [
        "| tower | layer | " + " | ".join(f"expert {e}" for e in range(num_experts)) + " |",
        "|" + "---|" * (num_experts + 2),
    ]
    for tower, entry in load.items():
        for layer, fractions in zip(entry["layers"], entry["load"]):
            cells = [f"{100 * f:.1f}%" for f in fractions] + [""] * (num_experts - len(fractions))
            lines.append(f"| {tower} | {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_expert_load(load: Dict[str, Dict[str, Any]], png_path: Union[str, os.PathLike], title: str = "") -> str:
    """Save a heatmap (layers x experts, a panel per tower) of the expert load as a PNG; returns the path."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, safe in any thread

    figure = Figure(figsize=(3.2 * len(load) + 1, 3.5))
    axes = figure.subplots(1, len(load), squeeze=False)[0]
    for axis, (tower, entry) in zip(axes, load.items()):
        values = torch.tensor(entry["load"]).numpy()
        image = axis.imshow(values, cmap="viridis", vmin=0.0, vmax=max(float(values.max()), 1e-9), aspect="auto")
        axis.set_title(f"{tower} (top-{entry['top_k']})")
        axis.set_xlabel("expert")
        axis.set_ylabel("layer")
        axis.set_xticks(range(entry["num_experts"]))
        axis.set_yticks(range(len(entry["layers"])))
        axis.set_yticklabels([str(layer) for layer in entry["layers"]])
        for row in range(values.shape[0]):
            for col in range(values.shape[1]):
                axis.text(col, row, f"{100 * values[row, col]:.0f}", ha="center", va="center", color="w", fontsize=7)
        figure.colorbar(image, ax=axis, fraction=0.046)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(png_path, dpi=120)
    return os.fspath(png_path)
