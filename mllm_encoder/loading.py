"""Load CLIP or CLIP-MoE models, from directories or memory, as CLIP-MoE classes.

Accepted: CLIP-MoE checkpoint directories, HF CLIP checkpoint directories (``CLIPModel``,
``CLIPVisionModel``, ``CLIPTextModel``; transformers 4.x and 5.x layouts), and in-memory models of
either family.
"""

import json
import os
from pathlib import Path
from typing import Dict, Type, Union

import torch
from transformers import PreTrainedModel

from mllm_encoder.configuration_clip_moe import CLIPMoEConfig, CLIPMoETextConfig, CLIPMoEVisionConfig
from mllm_encoder.modeling_clip_moe import (
    CLIPMoEModel,
    CLIPMoEPreTrainedModel,
    CLIPMoETextModel,
    CLIPMoEVisionModel,
)

ModelSource = Union[str, os.PathLike, PreTrainedModel]

MODEL_CLASS_BY_TYPE: Dict[str, Type[CLIPMoEPreTrainedModel]] = {
    "clip": CLIPMoEModel,
    "clip_moe": CLIPMoEModel,
    "clip_vision_model": CLIPMoEVisionModel,
    "clip_moe_vision_model": CLIPMoEVisionModel,
    "clip_text_model": CLIPMoETextModel,
    "clip_moe_text_model": CLIPMoETextModel,
}
CONFIG_CLASS_BY_MODEL = {
    CLIPMoEModel: CLIPMoEConfig,
    CLIPMoEVisionModel: CLIPMoEVisionConfig,
    CLIPMoETextModel: CLIPMoETextConfig,
}
TOWER_PREFIX = {CLIPMoEVisionModel: "vision_model.", CLIPMoETextModel: "text_model."}


def model_class_for(model_type: str, where: str) -> Type[CLIPMoEPreTrainedModel]:
    """The CLIP-MoE class that holds a model of HF/CLIP-MoE ``model_type``."""
    if model_type not in MODEL_CLASS_BY_TYPE:
        raise ValueError(
            f"{where}: model_type {model_type!r} is not a CLIP or CLIP-MoE model "
            f"(expected one of {sorted(MODEL_CLASS_BY_TYPE)})"
        )
    return MODEL_CLASS_BY_TYPE[model_type]


def read_model_type(directory: Union[str, os.PathLike]) -> str:
    """The ``model_type`` in ``directory/config.json``."""
    config_path = Path(directory) / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{directory}: no config.json (expected a CLIP or CLIP-MoE checkpoint directory)")
    try:
        return json.loads(config_path.read_text())["model_type"]
    except (json.JSONDecodeError, KeyError) as error:
        raise ValueError(f"{config_path}: cannot read model_type ({error})") from error


def tower_state_dict(state_dict: Dict[str, torch.Tensor], model_class: type) -> Dict[str, torch.Tensor]:
    """A state dict in our layout: prefix a bare tower (transformers 5.x ``CLIPVisionModel``), drop buffers."""
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith("position_ids")}
    prefix = TOWER_PREFIX.get(model_class)
    if prefix and not any(key.startswith(prefix) for key in state_dict):
        state_dict = {prefix + key: value for key, value in state_dict.items()}
    return state_dict


def from_hf_clip(model: PreTrainedModel) -> CLIPMoEPreTrainedModel:
    """Convert an in-memory HF ``CLIPModel``/``CLIPVisionModel``/``CLIPTextModel`` (dense CLIP-MoE)."""
    model_class = model_class_for(model.config.model_type, type(model).__name__)
    config = CONFIG_CLASS_BY_MODEL[model_class].from_dict(model.config.to_dict())
    converted = model_class(config)
    converted.load_state_dict(tower_state_dict(model.state_dict(), model_class))
    return converted.to(next(model.parameters()).dtype)


def load_clip_moe(source: ModelSource, **from_pretrained_kwargs) -> CLIPMoEPreTrainedModel:
    """Load ``source`` (a directory or an in-memory model) as a CLIP-MoE model of the matching kind."""
    if isinstance(source, CLIPMoEPreTrainedModel):
        return source
    if isinstance(source, PreTrainedModel):
        return from_hf_clip(source)
    model_class = model_class_for(read_model_type(source), str(source))
    return model_class.from_pretrained(source, **from_pretrained_kwargs)
