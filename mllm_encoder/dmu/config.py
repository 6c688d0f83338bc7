"""The YAML config of a DMU run: sections, defaults (the paper's recipe) and validation."""

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import yaml

METHODS = ("dmu", "upcycle", "finetune")


@dataclass
class DataSection:
    train: str = ""
    format: str = "auto"
    image_root: Optional[str] = None
    max_bad_fraction: float = 0.01
    num_workers: int = 0


@dataclass
class EvalSection:
    data: Optional[str] = None
    format: str = "auto"
    image_root: Optional[str] = None
    split: Optional[str] = "test"
    attributes: Optional[str] = None
    batch_size: int = 256


@dataclass
class DMUSection:
    num_experts: int = 4
    top_k: int = 2
    moe_layers: Optional[List[int]] = None
    image_clusters: int = 3
    text_clusters: int = 3
    kmeans_backend: str = "auto"
    extract_batch_size: int = 256


@dataclass
class StageSection:
    """One training stage; ``steps`` wins over ``epochs`` (epochs over the training set, rounded up).

    In the ``baseline`` section both are ignored: the baselines train for DMU's total step count.
    """

    steps: Optional[int] = None
    epochs: float = 1.0
    batch_size: int = 100
    grad_accum: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.2
    warmup_steps: int = 200
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    trainable: str = "ffn"
    temperature: float = 0.01
    label_smoothing: float = 0.1
    aux_loss_coef: float = 0.0


@dataclass
class RuntimeSection:
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    find_unused_parameters: bool = False
    save_every: int = 100
    log_every: int = 10


def _route_defaults() -> StageSection:
    return StageSection(lr=1e-6, weight_decay=0.01, trainable="router", aux_loss_coef=0.01, warmup_steps=0)


@dataclass
class RunConfig:
    """Everything a ``clip-moe dmu run`` needs; see ``configs/paper_vitl14_336_sharegpt4v.yaml``."""

    base_model: str = ""
    run_dir: str = "runs/dmu"
    seed: int = 0
    data: DataSection = field(default_factory=DataSection)
    eval: EvalSection = field(default_factory=EvalSection)
    dmu: DMUSection = field(default_factory=DMUSection)
    mcl: StageSection = field(default_factory=StageSection)
    route: StageSection = field(default_factory=_route_defaults)
    baseline: StageSection = field(default_factory=StageSection)
    runtime: RuntimeSection = field(default_factory=RuntimeSection)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _build(cls, values: Any, where: str, default: Any = None):
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(values).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; expected some of {sorted(known)}")
    base = asdict(default) if default is not None else {}
    return cls(**{**base, **values})


SECTIONS = {
    "data": DataSection,
    "eval": EvalSection,
    "dmu": DMUSection,
    "mcl": StageSection,
    "route": StageSection,
    "baseline": StageSection,
    "runtime": RuntimeSection,
}


TOP_LEVEL = ("base_model", "run_dir", "seed")


def config_from_dict(values: Dict[str, Any], where: str = "config") -> RunConfig:
    """Validate a nested dict (unknown keys are errors naming the section) into a :class:`RunConfig`."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping at the top level")
    defaults = RunConfig()
    kwargs = {}
    for key, value in values.items():
        if key in SECTIONS:
            kwargs[key] = _build(SECTIONS[key], value or {}, f"{where}: {key}", getattr(defaults, key))
        elif key in TOP_LEVEL:
            kwargs[key] = value
        else:
            expected = sorted([*SECTIONS, *TOP_LEVEL])
            raise ValueError(f"{where}: unknown top-level key {key!r}; expected {expected}")
    config = RunConfig(**kwargs)
    if not config.base_model or not config.data.train:
        raise ValueError(f"{where}: 'base_model' and 'data.train' are required")
    return config


def load_config(path: Union[str, Path]) -> RunConfig:
    """Read and validate a YAML run config."""
    try:
        values = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: invalid YAML ({error})") from error
    return config_from_dict(values, str(path))
