"""The demo's ``report.md``: the results table and PNG plots (loss curves, per-attribute accuracy, expert load)."""

import json
import shutil
from pathlib import Path
from typing import Any, Dict, List

from mllm_encoder.atomic import atomic_write_text

RETRIEVAL = ("i2t_r1", "t2i_r1")
HISTORIES = {
    "base (from scratch)": "base/train",
    "DMU: MCL stage 1": "run/dmu/mcl_1",
    "DMU: MCL stage 2": "run/dmu/mcl_2",
    "DMU: MCL stage 3": "run/dmu/mcl_3",
    "DMU: router tuning": "run/dmu/route",
    "direct fine-tuning": "run/finetune/train",
    "sparse upcycling": "run/upcycle/train",
}


def metric_columns(results: Dict[str, Dict[str, float]]) -> List[str]:
    """Retrieval R@1 both ways, then every per-attribute accuracy (``acc_mean`` last)."""
    keys = {key for metrics in results.values() for key in metrics}
    attributes = sorted(key for key in keys if key.startswith("acc_") and key != "acc_mean")
    return [*[k for k in RETRIEVAL if k in keys], *attributes, *(["acc_mean"] if "acc_mean" in keys else [])]


def format_table(results: Dict[str, Dict[str, float]]) -> str:
    """A Markdown table: one row per method, one column per metric (percent)."""
    columns = metric_columns(results)
    names = [c.replace("_r1", " R@1").replace("acc_", "") for c in columns]
    lines = ["| method | " + " | ".join(names) + " |", "|---|" + "---:|" * len(columns)]
    for method, metrics in results.items():
        best = {c: max(m.get(c, float("-inf")) for m in results.values()) for c in columns}
        cells = [f"**{metrics[c]:.1f}**" if metrics[c] == best[c] else f"{metrics[c]:.1f}" for c in columns]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def plot_losses(out_dir: Path, png: Path) -> None:
    """Training loss (contrastive part) per step of every training stage found under ``out_dir``."""
    figure = _figure(7, 4)
    axis = figure.subplots()
    for label, stage in HISTORIES.items():
        path = out_dir / stage / "history.json"
        if path.exists():
            history = json.loads(path.read_text())
            axis.plot([h["step"] for h in history], [h["contrastive"] for h in history], label=label)
    axis.set_xlabel("step")
    axis.set_ylabel("contrastive loss")
    axis.set_yscale("log")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(png, dpi=110)


def plot_attribute_accuracy(results: Dict[str, Dict[str, float]], png: Path) -> None:
    """Grouped bars: zero-shot accuracy of each attribute, one bar per method."""
    columns = [c for c in metric_columns(results) if c.startswith("acc_")]
    figure = _figure(8, 3.8)
    axis = figure.subplots()
    width = 0.8 / max(len(results), 1)
    for offset, (method, metrics) in enumerate(results.items()):
        xs = [i + (offset - (len(results) - 1) / 2) * width for i in range(len(columns))]
        axis.bar(xs, [metrics[c] for c in columns], width, label=method)
    axis.set_xticks(range(len(columns)))
    axis.set_xticklabels([c[4:] for c in columns])
    axis.set_ylabel("zero-shot accuracy (%)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(png, dpi=110)


def _verdict(results: Dict[str, Dict[str, float]]) -> str:
    """One line per headline metric: DMU minus the best baseline, stated plainly either way."""
    if not {"dmu", "finetune", "upcycle"} <= set(results):
        return ""
    lines = []
    for metric in ("i2t_r1", "t2i_r1", "acc_mean"):
        if metric in results["dmu"]:
            best = max(("finetune", "upcycle"), key=lambda m: results[m][metric])
            gap = results["dmu"][metric] - results[best][metric]
            verdict = "DMU beats it" if gap > 0 else "DMU does not beat it"
            lines.append(f"- {metric}: DMU - best baseline ({best}) = {gap:+.1f} points; {verdict}.")
    return "\n".join(lines)


def write_report(out_dir: Path, results: Dict[str, Dict[str, float]], settings: Dict[str, Any]) -> Path:
    """Write ``report.md`` and its plots into ``out_dir``."""
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    plot_losses(out_dir, plots / "loss_curves.png")
    plot_attribute_accuracy(results, plots / "attribute_accuracy.png")
    heatmaps = []
    for method in ("dmu", "upcycle"):
        source = out_dir / "run" / method / "eval" / "expert_load.png"
        if source.exists():
            shutil.copyfile(source, plots / f"expert_load_{method}.png")
            heatmaps.append(f"![{method} expert load](plots/expert_load_{method}.png)")
    text = "\n\n".join(
        [
            "# CLIP-MoE demo: Diversified Multiplet Upcycling on synthetic fine-grained shapes",
            "Held-out retrieval (R@1, %) and zero-shot accuracy per attribute (%, single-object images; "
            "background on all images). All methods start from the same dense base and train for the same "
            "number of steps.",
            format_table(results),
            _verdict(results),
            "## Training loss\n\n![loss curves](plots/loss_curves.png)",
            "## Per-attribute accuracy\n\n![attribute accuracy](plots/attribute_accuracy.png)",
            "## Expert load (held-out set)\n\n" + "\n".join(heatmaps),
            "## Settings\n\n```json\n" + json.dumps(settings, indent=1) + "\n```",
        ]
    )
    atomic_write_text(out_dir / "report.md", text + "\n")
    return out_dir / "report.md"
