"""The model families, each described once by one :class:`Family` record; every other table is derived here.

A family's record names its three model classes; through them it has its configs, the ``model_type``s it reads
(ours and HF's dense ones, each stated by its config class) and its contrastive loss (the two-tower model's
``loss_kind``). The record adds what no class states: the image processor class its checkpoints are saved with
and how its image tower serves LLaVA. ``import mllm_encoder`` registers every config/model pair with
``AutoConfig``/``AutoModel``; ``loading``, ``checkpoint``, ``losses``, the LLaVA tower and ``llava_patch`` read
the records. Adding a family: docs/architecture.md, "Adding a family".
"""

from typing import Dict, NamedTuple, Optional, Tuple, Type, Union

from torch import nn
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


class LlavaTower(NamedTuple):
    """How a family's image tower serves LLaVA (LLaVA-1.5 through ``llava_patch``, and transformers' Llava*)."""

    # transformers' vision_feature_select_strategy: "default" drops the first token (CLIP's class token),
    # "full" keeps every token (a tower without class token)
    feature_strategy: str
    # whether LLaVA-NeXT / OneVision builds take it: their processors count one class token per tile
    anyres: bool


class Family(NamedTuple):
    """One family: its two-tower model class and each tower's (their ``config_class`` is the config), the image
    processor its checkpoints get, and its LLaVA tower behaviour (``llava``; ``None``: it cannot serve as a LLaVA
    tower, for the reason ``not_llava``)."""

    model: Type[PreTrainedModel]
    vision_model: Type[PreTrainedModel]
    text_model: Type[PreTrainedModel]
    image_processor: str  # the transformers class name (transformers 4.37 lacks some: named, not imported)
    llava: Optional[LlavaTower]
    not_llava: str = ""

    @property
    def name(self) -> str:
        """The family's name: HF's ``model_type`` of its dense two-tower model (``clip``, ``siglip``)."""
        return self.model.config_class.hf_model_type

    @property
    def loss(self) -> str:
        """The family's contrastive loss kind (``mllm_encoder.losses.LOSS_KINDS``)."""
        return self.model.loss_kind

    @property
    def models(self) -> Tuple[Type[PreTrainedModel], ...]:
        """The two-tower model, the image tower and the text tower."""
        return self.model, self.vision_model, self.text_model

    def pairs(self) -> Tuple[Tuple[Type[PretrainedConfig], Type[PreTrainedModel]], ...]:
        """``(config, model)`` of the two-tower model, the image tower and the text tower."""
        return tuple((model.config_class, model) for model in self.models)

    def model_types(self) -> Dict[str, Type[PreTrainedModel]]:
        """The model class of each ``model_type`` the family reads: HF's dense ones and ours."""
        return {
            model_type: model
            for config, model in self.pairs()
            for model_type in (config.hf_model_type, config.model_type)
        }


FAMILIES: Dict[str, Family] = {
    family.name: family
    for family in (
        Family(CLIPMoEModel, CLIPMoEVisionModel, CLIPMoETextModel, "CLIPImageProcessor", LlavaTower("default", True)),
        Family(
            SiglipMoEModel, SiglipMoEVisionModel, SiglipMoETextModel, "SiglipImageProcessor", LlavaTower("full", False)
        ),
        Family(
            Siglip2MoEModel,
            Siglip2MoEVisionModel,
            Siglip2MoETextModel,
            "Siglip2ImageProcessor",
            None,
            "a NaFlex tower; LLaVA takes fixed-size patch grids: use a SigLIP 2 FixRes checkpoint (model_type siglip)",
        ),
    )
}
DEFAULT_FAMILY = FAMILIES["clip"]  # of a config without model_type (OpenAI CLIP conversions, old LLaVA configs)

# Derived tables: the class of every model_type we read, and our own model_types (what our checkpoints hold).
MODEL_CLASS_BY_TYPE: Dict[str, Type[PreTrainedModel]] = {
    model_type: model for family in FAMILIES.values() for model_type, model in family.model_types().items()
}
OUR_MODEL_TYPES: Tuple[str, ...] = tuple(
    config.model_type for family in FAMILIES.values() for config, _ in family.pairs()
)
MODEL_CLASSES: Tuple[Type[PreTrainedModel], ...] = tuple(
    model for family in FAMILIES.values() for model in family.models
)


def family_name(model_type: Optional[str]) -> str:
    """The family of a ``model_type``, ours or HF's: the longest family name it starts with (``siglip2_moe`` ->
    ``siglip2``, ``siglip_vision_model`` -> ``siglip``), and ``clip`` for any other or no ``model_type``."""
    model_type = model_type or ""
    return max((name for name in FAMILIES if model_type.startswith(name)), key=len, default=DEFAULT_FAMILY.name)


def family_of(model_type: Optional[str]) -> Family:
    """The :class:`Family` of a ``model_type`` (see :func:`family_name`)."""
    return FAMILIES[family_name(model_type)]


def family_of_model(model: Union[PreTrainedModel, Type[PreTrainedModel]]) -> Family:
    """The :class:`Family` holding a model class of ours (or an instance's class); ``ValueError`` otherwise."""
    model_class = model if isinstance(model, type) else type(model)
    for cls in model_class.__mro__:  # the most derived class of ours first (Siglip2MoEModel before SiglipMoEModel)
        for family in FAMILIES.values():
            if cls in family.models:
                return family
    raise ValueError(f"{model_class.__name__} is not a model of a CLIP-MoE family ({', '.join(FAMILIES)})")


def loss_kind_of(model: nn.Module) -> str:
    """The contrastive loss kind of a two-tower model's family, ours or HF's (by its config's ``model_type``;
    DDP / DeepSpeed wrappers are looked through): ``"softmax"`` for CLIP, ``"sigmoid"`` for SigLIP."""
    module = getattr(model, "module", model)
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    if model_type not in MODEL_CLASS_BY_TYPE or MODEL_CLASS_BY_TYPE[model_type] is not family_of(model_type).model:
        raise ValueError(
            f"{type(module).__name__} (model_type {model_type!r}) is not a two-tower model of a CLIP-MoE family; "
            f"pass the loss kind"
        )
    return family_of(model_type).loss
