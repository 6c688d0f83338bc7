"""Load CLIP or CLIP-MoE models, from directories or memory, as CLIP-MoE classes.

Accepted: CLIP-MoE checkpoint directories, HF CLIP checkpoint directories (``CLIPModel``,
``CLIPVisionModel``, ``CLIPTextModel``; transformers 4.x and 5.x layouts), and in-memory models of
either family.

Loading from a directory is strict: the config is checked field by field, every weight file must be readable,
and the weights must match the model exactly. The only tensors dropped on purpose are HF CLIP's
``position_ids`` buffers and, for a tower model read from a two-tower directory, the other tower and the
projections (``docs/checkpoints.md``).
"""

import os
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Type, Union

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import logging as transformers_logging

from mllm_encoder.checkpoint import check_finite, check_weight_files, read_model_type
from mllm_encoder.families import MODEL_CLASS_BY_TYPE, MODEL_CLASSES, family_of_model

ModelSource = Union[str, os.PathLike, PreTrainedModel]


def model_class_for(model_type: str, where: str) -> Type[PreTrainedModel]:
    """The CLIP-MoE class that holds a model of HF/CLIP-MoE ``model_type``."""
    if model_type not in MODEL_CLASS_BY_TYPE:
        raise ValueError(
            f"{where}: model_type {model_type!r} is not a CLIP or CLIP-MoE model "
            f"(expected one of {sorted(MODEL_CLASS_BY_TYPE)})"
        )
    return MODEL_CLASS_BY_TYPE[model_type]


def read_config(directory: Union[str, os.PathLike], model_class: Type[PreTrainedModel]) -> PretrainedConfig:
    """The checked config of ``model_class`` in ``directory``; a bad field raises ``ValueError`` naming the file."""
    try:
        return model_class.config_class.from_pretrained(directory)
    except ValueError as error:
        raise ValueError(f"{Path(directory) / 'config.json'}: {error}") from error


def _is_documented_drop(key: str) -> bool:
    """HF CLIP's ``position_ids`` buffers (transformers 4.x checkpoints) are recomputed, never loaded."""
    return key.endswith("position_ids")


def check_loading_info(info: Dict[str, Iterable[Any]], where: Union[str, os.PathLike]) -> None:
    """Raise ``ValueError`` when ``from_pretrained(..., output_loading_info=True)`` reports a mismatch."""
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(key for key in info.get("unexpected_keys") or () if not _is_documented_drop(key))
    mismatched = sorted(str(item[0] if isinstance(item, tuple) else item) for item in info.get("mismatched_keys") or ())
    errors = list(info.get("error_msgs") or ())
    problems = [
        f"{len(names)} {what} (e.g. {names[:4]})"
        for what, names in (
            ("missing tensor(s)", missing),
            ("unexpected tensor(s)", unexpected),
            ("tensor(s) of the wrong shape", mismatched),
            ("load error(s)", errors),
        )
        if names
    ]
    if problems:
        raise ValueError(
            f"{where}: the weights do not match the config: {'; '.join(problems)} "
            "(an incomplete checkpoint, or weights and config.json of different models)"
        )


def tower_state_dict(state_dict: Dict[str, torch.Tensor], model_class: type) -> Dict[str, torch.Tensor]:
    """A state dict in our layout: prefix a bare tower (transformers 5.x ``CLIPVisionModel``), drop buffers."""
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith("position_ids")}
    if model_class is family_of_model(model_class).model:
        return state_dict
    prefix = f"{model_class.base_model_prefix}."  # a tower model's tower module (``vision_model``, ``text_model``)
    if not any(key.startswith(prefix) for key in state_dict):
        state_dict = {prefix + key: value for key, value in state_dict.items()}
    return state_dict


def from_hf_clip(model: PreTrainedModel) -> PreTrainedModel:
    """Convert an in-memory HF ``CLIPModel``/``CLIPVisionModel``/``CLIPTextModel`` (dense CLIP-MoE)."""
    model_class = model_class_for(model.config.model_type, type(model).__name__)
    config = model_class.config_class.from_dict(model.config.to_dict())
    converted = model_class(config)
    converted.load_state_dict(tower_state_dict(model.state_dict(), model_class))
    return converted.to(next(model.parameters()).dtype)


def load_clip_moe(
    source: ModelSource, model_class: Optional[Type[PreTrainedModel]] = None, **from_pretrained_kwargs
) -> PreTrainedModel:
    """Load ``source`` (a directory or an in-memory model) as a CLIP-MoE model, strictly.

    ``model_class`` defaults to the class matching the directory's ``model_type``; a tower class reads that
    tower out of a two-tower directory. Raises ``ValueError`` naming the file for a bad config field, an
    unreadable weight file, weights that do not match the config, or NaN / infinite weights.
    """
    if isinstance(source, MODEL_CLASSES):
        return source
    if isinstance(source, PreTrainedModel):
        return from_hf_clip(source)
    stored_class = model_class_for(read_model_type(source), str(source))
    model_class = model_class or stored_class
    if model_class is not stored_class and family_of_model(model_class).model is not stored_class:
        raise ValueError(f"{source}: holds a {stored_class.__name__}, which has no {model_class.__name__} in it")
    config = read_config(source, model_class)
    check_weight_files(source)
    # Mismatches are collected (not raised half-way, nor logged as tables) and reported by check_loading_info.
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        model, info = model_class.from_pretrained(
            source, config=config, output_loading_info=True, ignore_mismatched_sizes=True, **from_pretrained_kwargs
        )
    finally:
        transformers_logging.set_verbosity(verbosity)
    check_loading_info(info, source)
    check_finite(model, str(source))
    return model
