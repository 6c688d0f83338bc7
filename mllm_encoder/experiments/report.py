"""The benchmark's numbers and words: seed statistics, the computed verdict, ``report.md`` and its plots.

A difference between two rows is called *significant* only when it exceeds the seed spread: ``|mean_a -
mean_b| > std_a + std_b`` (sample standard deviations over seeds; the two one-std bands do not overlap).
With one seed nothing is called significant. Every sentence of the verdict is computed from the numbers.
"""

import json
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from mllm_encoder.atomic import PathLike, atomic_write_text
from mllm_encoder.dmu.config import METHODS

ROWS = ("base", *(method for method in METHODS if method != "control"))  # the methods table: the base, then each method
METRICS = (
    "swap_size",
    "swap_light",
    "swap_grain",
    "swap_hidden",
    "probe_size",
    "probe_light",
    "probe_grain",
    "probe_hidden",
    "i2t_r1",
    "t2i_r1",
    "retain_i2t_r1",
    "retain_t2i_r1",
    "retain_swap_frame",
)
HEADLINE = ("swap_hidden", "probe_hidden", "i2t_r1", "t2i_r1", "retain_i2t_r1", "retain_t2i_r1", "retain_swap_frame")
CONTROL_METRICS = ("swap_size", "swap_light", "swap_grain", "swap_hidden", "probe_hidden", "i2t_r1", "t2i_r1")
SWAP_BARS = ("swap_size", "swap_light", "swap_grain", "retain_swap_frame")
Stats = Dict[str, Dict[str, Any]]


def seed_statistics(per_seed: Sequence[Dict[str, float]]) -> Stats:
    """``{metric: {"mean", "std", "per_seed"}}`` over seeds (sample std; 0 for one seed)."""
    out = {}
    for metric in per_seed[0]:
        values = [float(metrics[metric]) for metrics in per_seed]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        out[metric] = {"mean": statistics.fmean(values), "std": std, "per_seed": values}
    return out


def aggregate_results(seeds: List[int], metrics: Dict[int, Dict[str, Dict[str, float]]], num_experts: int) -> Dict:
    """``results.json``'s ``seeds``, ``methods``, ``experts``, ``control`` and ``verdict`` from per-seed metrics.

    ``metrics[seed]`` holds ``base``, ``finetune``, ``upcycle``, ``dmu``, ``expert_1..N-1`` and
    ``control_random``; expert 0 is the base and the control's cluster arm is expert 1 (MCL stage 1).
    """

    def rows(name: str) -> Stats:
        return seed_statistics([metrics[seed][name] for seed in seeds])

    experts = {"expert_0": rows("base"), **{f"expert_{s}": rows(f"expert_{s}") for s in range(1, num_experts)}}
    results = {
        "seeds": list(seeds),
        "methods": {method: rows(method) for method in ROWS},
        "experts": experts,
        "control": {"cluster": experts["expert_1"], "random": rows("control_random")},
    }
    results["verdict"] = verdict(results)
    return results


def compare(a: Dict[str, Any], b: Dict[str, Any], num_seeds: int) -> str:
    """``"significant gain"``, ``"significant loss"`` or ``"within the seed spread"`` of ``a`` over ``b``."""
    gap = a["mean"] - b["mean"]
    if num_seeds < 2 or abs(gap) <= a["std"] + b["std"]:
        return "within the seed spread" if num_seeds >= 2 else "one seed, no significance claimed"
    return "significant gain" if gap > 0 else "significant loss"


def _pm(entry: Dict[str, Any]) -> str:
    return f"{entry['mean']:.1f} ± {entry['std']:.1f}"


def verdict(results: Dict[str, Any]) -> List[str]:
    """The computed sentences: the stage-level control, DMU against the best baseline, retention, experts."""
    n = len(results["seeds"])
    methods, experts, control = results["methods"], results["experts"], results["control"]
    lines = []
    gains = []
    for metric in CONTROL_METRICS:
        cluster, random = control["cluster"][metric], control["random"][metric]
        outcome = compare(cluster, random, n)
        gains.append(outcome == "significant gain")
        lines.append(
            f"Control, {metric}: one-cluster batches {_pm(cluster)} vs random batches {_pm(random)} "
            f"({cluster['mean'] - random['mean']:+.1f} points, {outcome})."
        )
    wins, losses, ties = [], [], []
    for metric in HEADLINE:
        best = max(("finetune", "upcycle"), key=lambda m: methods[m][metric]["mean"])
        dmu, other = methods["dmu"][metric], methods[best][metric]
        outcome = compare(dmu, other, n)
        lines.append(
            f"DMU vs the best baseline on {metric} ({best}): {_pm(dmu)} vs {_pm(other)} "
            f"({dmu['mean'] - other['mean']:+.1f} points, {outcome})."
        )
        {"significant gain": wins, "significant loss": losses}.get(outcome, ties).append(metric)
    lines.append(
        f"Summary: DMU significantly beats both baselines on {_listing(wins)}; loses to the best on "
        f"{_listing(losses)}; is within the seed spread (or untested) on {_listing(ties)}."
    )
    for metric in ("retain_i2t_r1", "retain_t2i_r1", "retain_swap_frame"):
        base = methods["base"][metric]
        changes = ", ".join(
            f"{m} {methods[m][metric]['mean'] - base['mean']:+.1f}" for m in ("finetune", "upcycle", "dmu")
        )
        lines.append(f"Retention, {metric} (base {base['mean']:.1f}): change after training: {changes}.")
    best_expert = max(experts, key=lambda name: experts[name]["swap_hidden"]["mean"])
    lines.append(
        "Experts alone, swap_hidden: "
        + ", ".join(f"{name} {_pm(entry['swap_hidden'])}" for name, entry in experts.items())
        + f"; the assembled DMU model {_pm(methods['dmu']['swap_hidden'])} "
        f"({methods['dmu']['swap_hidden']['mean'] - experts[best_expert]['swap_hidden']['mean']:+.1f} vs the best "
        f"expert, {best_expert})."
    )
    return lines


def _listing(items: List[str]) -> str:
    return ", ".join(items) if items else "nothing"


def _table(rows: Dict[str, Stats], metrics: Sequence[str]) -> str:
    """A Markdown table, one row per entry, ``mean ± std`` per metric."""
    lines = ["| | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for name, stats in rows.items():
        lines.append(f"| {name} | " + " | ".join(_pm(stats[m]) for m in metrics) + " |")
    return "\n".join(lines)


def format_demo_table(results: Dict[str, Any]) -> str:
    """The headline table of ``results.json`` (methods x headline metrics, mean ± std over seeds)."""
    return _table(results["methods"], HEADLINE)


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def plot_bars(groups: Dict[str, Stats], metrics: Sequence[str], png: Path, ylabel: str) -> None:
    """Grouped bars (one group per metric, one bar per row) with one-std error bars."""
    figure = _figure(8, 3.8)
    axis = figure.subplots()
    width = 0.8 / max(len(groups), 1)
    for offset, (name, stats) in enumerate(groups.items()):
        xs = [i + (offset - (len(groups) - 1) / 2) * width for i in range(len(metrics))]
        means = [stats[m]["mean"] for m in metrics]
        axis.bar(xs, means, width, yerr=[stats[m]["std"] for m in metrics], capsize=3, label=name)
    axis.set_xticks(range(len(metrics)))
    axis.set_xticklabels(metrics, fontsize=8)
    axis.set_ylabel(ylabel)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(png, dpi=110)


def loss_series(histories: Dict[str, PathLike]) -> Dict[str, Tuple[List[int], List[float]]]:
    """``{label: (steps, contrastive losses)}`` read from each stage's ``history.json``."""
    series = {}
    for label, path in histories.items():
        history = json.loads(Path(path).read_text())
        series[label] = ([h["step"] for h in history], [h["contrastive"] for h in history])
    return series


def plot_losses(series: Dict[str, Tuple[List[int], List[float]]], png: Path) -> None:
    """Contrastive training loss per step, one curve per entry of ``series`` (:func:`loss_series`)."""
    figure = _figure(7, 4)
    axis = figure.subplots()
    for label, (steps, losses) in series.items():
        axis.plot(steps, losses, label=label)
    axis.set_xlabel("step")
    axis.set_ylabel("contrastive loss")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(png, dpi=110)


def _router_section(out_dir: Path, plots: Path, loads: Dict[str, Any]) -> str:
    from mllm_encoder.eval.router_analysis import format_load_table, plot_expert_load

    if not loads:
        return "No router load recorded."
    seed, load = next(iter(loads.items()))
    parts = []
    for split, entry in load.items():
        png = plot_expert_load(entry, plots / f"router_load_{split}.png", title=f"DMU ({seed}), {split}")
        parts.append(f"{split} ({seed}):\n\n{format_load_table(entry)}\n\n![]({Path(png).relative_to(out_dir)})")
    return "\n\n".join(parts)


def write_report(
    out_dir: Path,
    results: Dict[str, Any],
    timings: Optional[Dict[str, float]] = None,
    histories: Optional[Dict[str, PathLike]] = None,
) -> Path:
    """Write ``report.md`` and its plots (``plots/*.png``) into ``out_dir``; ``histories`` (``{curve label:
    history.json}``, the paths the run manifest recorded) are the loss curves of the first seed."""
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    methods, experts, control = results["methods"], results["experts"], results["control"]
    plot_bars(methods, SWAP_BARS, plots / "attributes_methods.png", "caption-swap accuracy (%)")
    plot_bars(experts, SWAP_BARS, plots / "attributes_experts.png", "caption-swap accuracy (%)")
    seed = results["seeds"][0]
    plot_losses(loss_series(histories or {}), plots / "loss_curves.png")
    total = sum(timings.values()) if timings else 0.0
    text = "\n\n".join(
        [
            "# CLIP-MoE demo: does DMU do what the paper claims, at CPU scale?",
            f"Seeds {results['seeds']}; every cell is mean ± sample std over seeds (the base is shared by all "
            "seeds, so its std is 0). Percent. A difference is called significant only when it exceeds the sum "
            "of the two stds. Design and rationale: `docs/dmu.md`.",
            "## Verdict (computed from the numbers)\n\n" + "\n".join(f"- {line}" for line in results["verdict"]),
            "## Methods at equal optimizer steps\n\n" + _table(methods, METRICS),
            "![caption-swap accuracy per method](plots/attributes_methods.png)",
            "## Each expert alone (expert 0 = the base, expert s = MCL stage s as a dense model)\n\n"
            + _table(experts, METRICS),
            "![caption-swap accuracy per expert](plots/attributes_experts.png)",
            "## Stage-level control: MCL stage 1 on one-cluster vs random batches, equal steps\n\n"
            + _table(control, METRICS),
            "## Router load of the DMU model (held-out images and captions)\n\n"
            + _router_section(out_dir, plots, results.get("router_load", {})),
            f"## Training loss (seed {seed})\n\n![loss curves](plots/loss_curves.png)",
            f"## Wall time\n\n{total:.0f} s over the recorded steps (this invocation and any it resumed)."
            + ("\n\n```json\n" + json.dumps(timings, indent=1) + "\n```" if timings else ""),
            "## Settings\n\n```json\n" + json.dumps(results.get("settings", {}), indent=1) + "\n```",
        ]
    )
    atomic_write_text(out_dir / "report.md", text + "\n")
    return out_dir / "report.md"
