"""The model families, named once: each one's model classes (and through them its configs) and the HF
``model_type``s it reads.

``import mllm_encoder`` registers every config/model pair with ``AutoConfig``/``AutoModel``,
``mllm_encoder.loading`` maps every ``model_type`` to its class, the LLaVA vision tower picks its family's
image tower here, and :func:`family_name` tells the family of any ``model_type`` (the one place that does).
"""

from typing import Dict, NamedTuple, Optional, Tuple, Type

from transformers import PretrainedConfig, PreTrainedModel

from mllm_encoder.modeling_clip_moe import CLIPMoEModel, CLIPMoETextModel, CLIPMoEVisionModel
from mllm_encoder.modeling_siglip_moe import (
    Siglip2MoEModel,
    Siglip2MoETextModel,
    Siglip2MoEVisionModel,
    SiglipMoEModel,
    SiglipMoETextModel,
    SiglipMoEVisionModel,
)

# HF's model_type of a family's models is the family's name plus one of these (CLIPModel: "clip",
# CLIPVisionModel: "clip_vision_model", CLIPTextModel: "clip_text_model"), in the order of Family.models.
HF_MODEL_TYPE_SUFFIXES = ("", "_vision_model", "_text_model")


class Family(NamedTuple):
    """One family: its two-tower model class and each tower's (their ``config_class`` is the config)."""

    name: str  # HF's model_type of the family's two-tower model
    model: Type[PreTrainedModel]
    vision_model: Type[PreTrainedModel]
    text_model: Type[PreTrainedModel]

    @property
    def models(self) -> Tuple[Type[PreTrainedModel], ...]:
        """The two-tower model, the image tower and the text tower."""
        return self.model, self.vision_model, self.text_model

    def pairs(self) -> Tuple[Tuple[Type[PretrainedConfig], Type[PreTrainedModel]], ...]:
        """``(config, model)`` of the two-tower model, the image tower and the text tower."""
        return tuple((model.config_class, model) for model in self.models)

    def model_types(self) -> Dict[str, Type[PreTrainedModel]]:
        """The model class of each ``model_type`` the family reads: HF's dense ones and ours."""
        types = {}
        for suffix, model in zip(HF_MODEL_TYPE_SUFFIXES, self.models):
            types[self.name + suffix] = model
            types[model.config_class.model_type] = model
        return types


FAMILIES: Dict[str, Family] = {
    family.name: family
    for family in (
        Family("clip", CLIPMoEModel, CLIPMoEVisionModel, CLIPMoETextModel),
        Family("siglip", SiglipMoEModel, SiglipMoEVisionModel, SiglipMoETextModel),
        Family("siglip2", Siglip2MoEModel, Siglip2MoEVisionModel, Siglip2MoETextModel),
    )
}


def family_name(model_type: Optional[str]) -> str:
    """The family of a ``model_type``, ours or HF's: the longest family name it starts with (``siglip2_moe`` ->
    ``siglip2``, ``siglip_vision_model`` -> ``siglip``), and ``clip`` for any other or no ``model_type``."""
    model_type = model_type or ""
    return max((name for name in FAMILIES if model_type.startswith(name)), key=len, default="clip")
