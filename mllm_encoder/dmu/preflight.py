"""What ``clip-moe dmu run`` checks before any stage: the config against the base model, the data and the installed
libraries; the run directory (the output rule); and a changed config against the stages that already finished.

Every error reads ``FILE: KEY: problem; fix``, where ``FILE`` is the run config (``where``).
"""

import importlib.util
import logging
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from mllm_encoder.atomic import PathLike, check_output
from mllm_encoder.checkpoint import read_config_dict
from mllm_encoder.dmu.config import DATA_INDEX, RunConfig, config_differences
from mllm_encoder.dmu.run_state import STATE_PREFIX

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
LOG_NAME = "run.log"
# The k-means backends and the module each needs (``auto`` needs none: it picks among the installed ones).
KMEANS_MODULES = {"sklearn": "sklearn", "torch": "torch", "faiss": "faiss"}


def installed_kmeans_backends() -> List[str]:
    """The k-means backends whose library is installed (the one place that knows what each needs)."""
    return [name for name, module in KMEANS_MODULES.items() if importlib.util.find_spec(module) is not None]


def check_against_base(config: RunConfig, where: str, methods: Sequence[str]) -> None:
    """The run config against the base model's ``config.json``: MoE layer indices within each tower's depth, the
    text context longer than the base's; and ``dmu.kmeans_backend`` installed."""
    base_file = Path(config.base_model) / "config.json"
    base = read_config_dict(config.base_model, "the base model (base_model)")
    towers = {name: base[name] for name in ("vision_config", "text_config") if isinstance(base.get(name), dict)}
    if not towers:
        towers = {"config": base}
    for tower, values in towers.items():
        depth = values.get("num_hidden_layers")
        if not isinstance(depth, int):
            continue
        for index in config.dmu.moe_layers or ():
            if index >= depth:
                raise ValueError(
                    f"{where}: dmu.moe_layers: layer index {index} is out of range for the base's {tower} "
                    f"({base_file}: {tower}.num_hidden_layers={depth}); use indices below {depth}"
                )
    context = towers.get("text_config", {}).get("max_position_embeddings")
    if config.dmu.text_context is not None and isinstance(context, int) and config.dmu.text_context <= context:
        raise ValueError(
            f"{where}: dmu.text_context: {config.dmu.text_context} is not longer than the base's text context "
            f"({base_file}: text_config.max_position_embeddings={context}); set a larger value or null"
        )
    backend = config.dmu.kmeans_backend
    if any(method in ("dmu", "control") for method in methods) and backend != "auto":
        installed = installed_kmeans_backends()
        if backend not in installed:
            raise ValueError(
                f"{where}: dmu.kmeans_backend: {backend!r} is not installed (installed: {installed}); "
                f"choose one of {installed + ['auto']} or install {KMEANS_MODULES[backend]}"
            )


def _sections_of(methods: Sequence[str]) -> List[str]:
    sections = set()
    for method in methods:
        sections |= {"dmu": {"mcl", "route"}, "control": {"mcl"}}.get(method, {"baseline"})
    return sorted(sections)


def check_against_data(
    config: RunConfig, where: str, methods: Sequence[str], num_samples: int, world_size: int = 1
) -> None:
    """The run config against the training set's size: cluster counts and one global batch per training stage."""
    if any(method in ("dmu", "control") for method in methods):
        for key in ("image_clusters", "text_clusters"):
            value = getattr(config.dmu, key)
            if value > num_samples:
                raise ValueError(
                    f"{where}: dmu.{key}: {value} clusters for {num_samples} training samples; "
                    f"use at most {num_samples} (or more data)"
                )
    for section in _sections_of(methods):
        stage = getattr(config, section)
        batch = stage.batch_size * world_size
        if stage.drop_last and batch > num_samples:
            raise ValueError(
                f"{where}: {section}.batch_size: one batch of {stage.batch_size} x {world_size} process(es) is more "
                f"than the {num_samples} training samples, so no step could run; use at most "
                f"{num_samples // world_size}"
            )


def is_run_directory(path: Path) -> bool:
    """Whether ``path`` is a DMU run directory: it has a run manifest (or only the log, lock and data index of a
    run that stopped before writing one)."""
    names = {entry.name for entry in path.iterdir()}
    return MANIFEST_NAME in names or names <= {LOG_NAME, ".lock", DATA_INDEX}


def check_run_directory(run_dir: PathLike, inputs: Iterable[Optional[PathLike]], overwrite: bool) -> None:
    """The output rule for a run directory: absent, empty or a run directory; another non-empty directory only
    with ``overwrite``; never one of the run's inputs."""
    check_output(run_dir, inputs, overwrite, ours=is_run_directory, directory=True, what="a DMU run directory")


# What each stage's result depends on, as config keys (a key covers its sub-keys).
_STRETCH = ("base_model", "dmu.text_context")
_DATA = ("data.train", "data.format", "data.image_root", "data.allow_absolute_paths")
_EXTRACT = _STRETCH + _DATA + ("dmu.extract_batch_size",)
_CLUSTER = _EXTRACT + (
    "dmu.image_clusters",
    "dmu.text_clusters",
    "dmu.kmeans_backend",
    "dmu.kmeans_sample_size",
    "dmu.kmeans_restarts",
    "dmu.kmeans_tolerance",
    "seed",
)
_MCL = _CLUSTER + ("mcl",)
_ASSEMBLE = ("dmu.num_experts", "dmu.top_k", "dmu.moe_layers")
_BASELINE = _STRETCH + _DATA + ("seed", "baseline", "mcl", "route") + _ASSEMBLE
_DEPENDENCIES: Dict[str, Tuple[str, ...]] = {
    "base/stretch": _STRETCH,
    "base/eval": _STRETCH,
    "dmu/assemble": _MCL + _ASSEMBLE,
    "dmu/route": _MCL + _ASSEMBLE + ("route",),
    "dmu/eval": _MCL + _ASSEMBLE + ("route",),
    "expert_1/eval": _MCL,
    "finetune/train": _BASELINE,
    "finetune/eval": _BASELINE,
    "upcycle/train": _BASELINE,
    "upcycle/eval": _BASELINE,
    "control/train": _STRETCH + _DATA + ("seed", "mcl"),
    "control/eval": _STRETCH + _DATA + ("seed", "mcl"),
}


def stage_dependencies(stage: str) -> Optional[Tuple[str, ...]]:
    """The config keys the result of ``stage`` depends on (its own and its inputs'); None when unknown (all)."""
    if stage.startswith(("dmu/extract_", "dmu/cluster_", "dmu/mcl_")):
        keys = {"dmu/extract_0": _EXTRACT, "dmu/cluster_0": _CLUSTER}.get(stage, _MCL)
    else:
        keys = _DEPENDENCIES.get(stage)
    if keys is not None and stage.endswith("/eval"):
        keys = keys + ("eval",)
    return keys


def _depends(key: str, dependencies: Optional[Tuple[str, ...]]) -> bool:
    return dependencies is None or any(key == dep or key.startswith(dep + ".") for dep in dependencies)


def _started_stages(run_dir: Path) -> List[str]:
    """Unfinished training stages with a saved training state (resuming them with other values would mix)."""
    return sorted(
        str(state.parent.parent.relative_to(run_dir))
        for state in run_dir.glob(f"**/train_state/{STATE_PREFIX}*[0-9]")
        if state.is_dir()
    )


def check_config_change(
    previous: Dict[str, Any], current: Dict[str, Any], finished: Iterable[str], run_dir: Path, where: str
) -> List[str]:
    """The keys that differ between the run's recorded config and ``current`` (``runtime`` and ``run_dir`` may
    change freely); ``ValueError`` when a finished stage, or a started training stage, depends on one of them."""
    ignored = ("runtime", "run_dir")
    old = {key: value for key, value in previous.items() if key not in ignored}
    new = {key: value for key, value in current.items() if key not in ignored}
    differing = config_differences(old, new)
    started = [stage for stage in _started_stages(run_dir) if stage not in finished]
    for stage in [*finished, *started]:
        blocked = [key for key in differing if _depends(key, stage_dependencies(stage))]
        if blocked:
            state = "finished" if stage in finished else "started (it has a saved training state)"
            raise ValueError(
                f"{where}: the run directory {run_dir} was started with a different config (differs in "
                f"{', '.join(blocked)}), and stage {stage}, which depends on it, has {state}; restore those values "
                "or use a new run_dir"
            )
    return differing
