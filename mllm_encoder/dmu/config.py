"""The typed configuration of DMU: one dataclass per concept, defaults (the paper's recipe) and validation.

``StageSection`` is the one description of a training stage's hyper-parameters: the YAML sections ``mcl``,
``route`` and ``baseline``, the ``clip-moe dmu mcl|route`` flags and the demo all build it, and the trainer
reads it (wrapped with the resolved step count in :class:`mllm_encoder.dmu.trainer.TrainConfig`).
Every field is type- and range-checked with its ``section.field`` named, before any work starts.
"""

import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import yaml

# The methods of `clip-moe dmu run --method`, in the order `--method all` and the demo run them (control: the
# stage-level control); the demo and its report read this list.
METHODS = ("finetune", "upcycle", "dmu", "control")
TRAINABLE = ("all", "ffn", "router", "ffn+router")
PRECISIONS = ("auto", "no", "bf16", "fp16")
KMEANS_BACKENDS = ("auto", "sklearn", "torch", "faiss")
# The training data's index (records/ or shards/), built once: run_dir/data_index/, or a stage command's OUT/data_index/
DATA_INDEX = "data_index"
LOSSES = ("softmax", "sigmoid")

# Range rules, by field name: (predicate, what the value must be).
_POSITIVE = (lambda v: v > 0, "> 0")
_NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
_RULES: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    "steps": _POSITIVE,
    "epochs": _POSITIVE,
    "batch_size": _POSITIVE,
    "grad_accum": _POSITIVE,
    "lr": _POSITIVE,
    "weight_decay": _NON_NEGATIVE,
    "warmup_steps": _NON_NEGATIVE,
    "min_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "grad_clip": _POSITIVE,
    "adam_eps": _POSITIVE,
    "adam_betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    "temperature": _POSITIVE,
    "label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "aux_loss_coef": _NON_NEGATIVE,
    "max_bad_fraction": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "num_workers": _NON_NEGATIVE,
    "num_experts": (lambda v: v >= 2, ">= 2 (the base and at least one MCL stage)"),
    "top_k": _POSITIVE,
    "image_clusters": _POSITIVE,
    "text_clusters": _POSITIVE,
    "extract_batch_size": _POSITIVE,
    "kmeans_sample_size": (lambda v: v >= 1, ">= 1"),
    "kmeans_restarts": (lambda v: v >= 1, ">= 1"),
    "kmeans_tolerance": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "process_group_timeout_s": _POSITIVE,
    "text_context": (lambda v: v >= 2, ">= 2"),
    "save_every": _POSITIVE,
    "log_every": _POSITIVE,
    "moe_layers": (lambda v: all(layer >= 0 for layer in v), "non-negative layer indices"),
}
_CHOICES: Dict[str, Tuple[str, ...]] = {
    "trainable": TRAINABLE,
    "mixed_precision": PRECISIONS,
    "kmeans_backend": KMEANS_BACKENDS,
    "loss": LOSSES,
}


@dataclass(frozen=True)
class DataSection:
    """Training data: a file or folder in any supported format (see :mod:`mllm_encoder.data`)."""

    train: str = ""
    format: str = "auto"
    image_root: Optional[str] = None
    allow_absolute_paths: bool = False
    max_bad_fraction: float = 0.01
    num_workers: int = 0


@dataclass
class EvalSection:
    """Held-out retrieval data (and, for synthetic sets, its attributes file)."""

    data: Optional[str] = None
    format: str = "auto"
    image_root: Optional[str] = None
    split: Optional[str] = "test"
    attributes: Optional[str] = None
    batch_size: int = 256


@dataclass
class DMUSection:
    """The MoE to build and the clustering of every MCL stage.

    ``text_context``: stretch the text position embeddings to this many tokens before any training
    (Long-CLIP's knowledge-preserving stretching; the paper uses 248); ``None`` keeps the base's.
    ``kmeans_backend``: ``auto`` and ``torch`` are the project's own k-means (streamed, over every rank,
    the same labels whatever is installed); ``faiss`` and ``sklearn`` on request. ``kmeans_sample_size``: the
    samples the k-means++ seeding (and faiss / scikit-learn's training) uses; all of them when there are fewer.
    ``kmeans_restarts``: fits on that sample, the one of least inertia kept. ``kmeans_tolerance``: the passes
    over all samples (when the sample is not all of them) stop once at most this fraction of labels changes.
    """

    num_experts: int = 4
    top_k: int = 2
    moe_layers: Optional[List[int]] = None
    image_clusters: int = 3
    text_clusters: int = 3
    kmeans_backend: str = "auto"
    kmeans_sample_size: int = 100_000  # 307 MB of float32 rows at dim 768
    kmeans_restarts: int = 4
    kmeans_tolerance: float = 1e-4
    extract_batch_size: int = 256
    text_context: Optional[int] = None


@dataclass
class StageSection:
    """One training stage; ``steps`` wins over ``epochs`` (passes over the batches the stage draws, rounded up).

    The defaults are the official MCL recipe (``train/train_mcl.py`` of OpenSparseLLMs/CLIP-MoE):
    AdamW with torch's default betas/eps and weight decay on every trainable tensor, no gradient clipping
    (``grad_clip: null``), 200 warmup steps then cosine decay, and ``drop_last`` (a cluster's remainder is
    dropped; clusters smaller than one global batch are skipped). ``loss``, ``temperature`` and
    ``label_smoothing`` left ``null`` follow the base model's family: CLIP's softmax loss at the paper's fixed
    temperature 0.01 with smoothing 0.1; SigLIP's sigmoid loss with the model's learned scale and bias.
    ``batch_size`` is per process and micro-step. In the ``baseline`` section ``steps``/``epochs`` are
    ignored: the baselines train for DMU's total step count.
    """

    steps: Optional[int] = None
    epochs: float = 1.0
    batch_size: int = 100
    grad_accum: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.2
    decay_norms_and_biases: bool = True
    adam_betas: Tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_steps: int = 200
    min_lr_ratio: float = 0.0
    grad_clip: Optional[float] = None
    trainable: str = "ffn"
    loss: Optional[str] = None
    temperature: Optional[float] = None
    label_smoothing: Optional[float] = None
    aux_loss_coef: float = 0.0
    drop_last: bool = True


@dataclass
class RuntimeSection:
    """How the run executes; may change between a run and its resume.

    ``process_group_timeout_s``: how long a collective (e.g. a barrier while the main process writes) waits
    for the other processes before the run fails (torch's default is 10 or 30 minutes).
    """

    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    find_unused_parameters: bool = False
    save_every: int = 100
    log_every: int = 10
    process_group_timeout_s: int = 7200


def route_defaults() -> StageSection:
    """The router stage of the official ``train/train_moe.py``: routers only, lr 1e-6, wd 0.01, aux 0.01."""
    return StageSection(lr=1e-6, weight_decay=0.01, trainable="router", aux_loss_coef=0.01)


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
    route: StageSection = field(default_factory=route_defaults)
    baseline: StageSection = field(default_factory=StageSection)
    runtime: RuntimeSection = field(default_factory=RuntimeSection)

    def to_dict(self) -> Dict[str, Any]:
        values = asdict(self)
        for name in ("mcl", "route", "baseline"):
            values[name]["adam_betas"] = list(values[name]["adam_betas"])  # YAML-friendly
        return values


SECTIONS = {
    "data": DataSection,
    "eval": EvalSection,
    "dmu": DMUSection,
    "mcl": StageSection,
    "route": StageSection,
    "baseline": StageSection,
    "runtime": RuntimeSection,
}
TOP_LEVEL = {"base_model": str, "run_dir": str, "seed": int}


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """``value`` checked against a field annotation (int accepted for float; bool never for numbers)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Union:  # Optional[X]
        if value is None:
            return None
        return _coerce(value, next(arg for arg in args if arg is not type(None)), where)
    if origin in (list, tuple, List, Tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        items = [_coerce(item, args[0], f"{where}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if origin in (tuple, Tuple) else items
    if annotation is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is float and isinstance(value, str):
        try:  # PyYAML reads `1e-5` (no dot) as a string
            return float(value)
        except ValueError:
            raise ValueError(f"{where}: expected float, got {value!r}") from None
    if annotation in (int, float):
        numeric = (int, float) if annotation is float else (int,)
        if isinstance(value, bool) or not isinstance(value, numeric):
            raise ValueError(f"{where}: expected {_type_name(annotation)}, got {value!r}")
        return annotation(value)
    if annotation is str and not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {value!r}")
    return value


def _check_value(name: str, value: Any, where: str) -> None:
    if value is None:
        return
    if name in _RULES:
        predicate, expected = _RULES[name]
        if not predicate(value):
            raise ValueError(f"{where}: must be {expected}, got {value!r}")
    if name in _CHOICES and value not in _CHOICES[name]:
        raise ValueError(f"{where}: must be one of {list(_CHOICES[name])}, got {value!r}")


def build_section(cls, values: Any, where: str, default: Any = None):
    """A section dataclass from a mapping, every field type- and range-checked (errors name ``where.field``)."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; expected some of {sorted(known)}")
    merged = {**(asdict(default) if default is not None else {}), **values}
    checked = {}
    for name, value in merged.items():
        checked[name] = _coerce(value, hints[name], f"{where}.{name}")
        _check_value(name, checked[name], f"{where}.{name}")
    return cls(**checked)


def check_section(section: Any, where: str) -> None:
    """Re-check a section built in code (CLI flags, the demo) with the same rules as the YAML."""
    build_section(type(section), asdict(section), where)


def _check_cross_fields(config: RunConfig, where: str) -> None:
    dmu = config.dmu
    if dmu.top_k > dmu.num_experts:
        raise ValueError(f"{where}: dmu.top_k ({dmu.top_k}) must be <= dmu.num_experts ({dmu.num_experts})")
    for name in ("mcl", "route", "baseline"):
        section: StageSection = getattr(config, name)
        if section.steps is not None and section.warmup_steps > section.steps:
            raise ValueError(f"{where}: {name}.warmup_steps ({section.warmup_steps}) > {name}.steps ({section.steps})")
    if config.route.trainable not in ("router", "ffn+router"):
        raise ValueError(f"{where}: route.trainable must be 'router' or 'ffn+router', got {config.route.trainable!r}")
    if config.eval.attributes is not None and config.eval.data is None:
        raise ValueError(f"{where}: eval.attributes needs eval.data")


def config_from_dict(values: Dict[str, Any], where: str = "config") -> RunConfig:
    """Validate a nested dict into a :class:`RunConfig`: unknown keys, types, ranges and cross-field rules."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping at the top level")
    defaults = RunConfig()
    kwargs = {}
    for key, value in values.items():
        if key in SECTIONS:
            kwargs[key] = build_section(SECTIONS[key], value or {}, f"{where}: {key}", getattr(defaults, key))
        elif key in TOP_LEVEL:
            kwargs[key] = _coerce(value, TOP_LEVEL[key], f"{where}: {key}")
        else:
            expected = sorted([*SECTIONS, *TOP_LEVEL])
            raise ValueError(f"{where}: unknown top-level key {key!r}; expected {expected}")
    config = RunConfig(**kwargs)
    for key in ("base_model", "run_dir"):
        if not getattr(config, key):
            raise ValueError(f"{where}: {key!r} is required")
    if not config.data.train:
        raise ValueError(f"{where}: 'data.train' is required")
    _check_cross_fields(config, where)
    return config


def load_config(path: Union[str, Path]) -> RunConfig:
    """Read and validate a YAML run config."""
    try:
        values = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        raise ValueError(f"{path}: cannot read the config ({error.strerror or error})") from error
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: invalid YAML ({error})") from error
    return config_from_dict(values, str(path))


def config_differences(old: Dict[str, Any], new: Dict[str, Any], prefix: str = "") -> List[str]:
    """The dotted keys whose values differ between two nested config dicts."""
    keys = sorted(set(old) | set(new))
    differing = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            differing += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            differing.append(f"{prefix}{key}")
    return differing
