"""Assemble transformers' ``LlavaForConditionalGeneration`` from a CLIP-MoE or SigLIP-MoE checkpoint and a causal LM.

The projector starts random (train it like LLaVA's stage 1). The vision tower is a ``CLIPMoEVisionModel`` or a
``SiglipMoEVisionModel``, picked from the checkpoint's config (``import mllm_encoder`` registers both with
``AutoConfig``/``AutoModel``), so the result saves and reloads with ``LlavaForConditionalGeneration.from_pretrained``.
The checkpoint is loaded strictly; the language model runs no code from its folder unless ``trust_remote_code=True``.
"""

from typing import Any, NamedTuple, Optional, Sequence, Tuple, Type

from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.image_processing_utils import BaseImageProcessor

from mllm_encoder.atomic import PathLike
from mllm_encoder.checkpoint import load_image_processor, read_vision_config_dict
from mllm_encoder.families import Family
from mllm_encoder.loading import load_clip_moe
from mllm_encoder.vision_tower import tower_family


def llava_vision_tower(model: LlavaForConditionalGeneration) -> nn.Module:
    """The vision tower of a Llava model (``model.vision_tower`` up to transformers 4.51, then ``model.model``)."""
    return model.vision_tower if hasattr(model, "vision_tower") else model.model.vision_tower


class LlavaParts(NamedTuple):
    """What every Llava* build starts from: the tower's family and model, the tokenizer and the causal LM."""

    family: Family
    vision: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    language_model: PreTrainedModel

    def assemble(self, config_class: Type[PretrainedConfig], model_class: Type[PreTrainedModel], **config: Any):
        """A ``model_class`` of ``config_class(vision_config=..., text_config=..., **config)`` holding the tower's
        and the LM's weights (the projector, and whatever else the model adds, stay as initialised)."""
        model = model_class(
            config_class(vision_config=self.vision.config, text_config=self.language_model.config, **config)
        )
        llava_vision_tower(model).load_state_dict(self.vision.state_dict())
        model.get_decoder().load_state_dict(self.language_model.get_decoder().state_dict())
        model.get_output_embeddings().load_state_dict(self.language_model.get_output_embeddings().state_dict())
        return model


def load_llava_parts(
    clip_moe_dir: PathLike,
    llm_dir: PathLike,
    special_tokens: Sequence[str],
    trust_remote_code: bool = False,
    towers: Optional[Sequence[Type[PreTrainedModel]]] = None,
) -> LlavaParts:
    """The tower of ``clip_moe_dir`` (loaded strictly) and the tokenizer and LM of ``llm_dir``, with the
    ``special_tokens`` the tokenizer lacks added (the LM's embeddings grow with them).

    Raises:
        ValueError: before anything is loaded, when the checkpoint's family cannot serve as a LLaVA tower or
            ``towers`` (default: every LLaVA tower class) lacks the checkpoint's tower class.
    """
    family = tower_family(read_vision_config_dict(clip_moe_dir), str(clip_moe_dir))
    tower_class = family.vision_model
    if towers is not None and tower_class not in towers:
        accepted = " or ".join(tower.__name__ for tower in towers)
        raise ValueError(f"{clip_moe_dir}: holds a {tower_class.__name__} tower; this build takes only {accepted}")
    vision = load_clip_moe(clip_moe_dir, tower_class)
    tokenizer = AutoTokenizer.from_pretrained(str(llm_dir), trust_remote_code=trust_remote_code)
    new_tokens = [token for token in special_tokens if token not in tokenizer.get_vocab()]
    if new_tokens:
        tokenizer.add_tokens(new_tokens, special_tokens=True)
    language_model = AutoModelForCausalLM.from_pretrained(str(llm_dir), trust_remote_code=trust_remote_code)
    language_model.resize_token_embeddings(len(tokenizer))
    return LlavaParts(family, vision, tokenizer, language_model)


def build_hf_llava(
    clip_moe_dir: PathLike,
    llm_dir: PathLike,
    vision_feature_layer: int = -2,
    image_token: str = "<image>",
    projector_hidden_act: str = "gelu",
    trust_remote_code: bool = False,
) -> Tuple[LlavaForConditionalGeneration, PreTrainedTokenizerBase, BaseImageProcessor]:
    """A Llava model with the vision weights of ``clip_moe_dir`` (CLIP-MoE or SigLIP-MoE) and the LM of ``llm_dir``.

    ``image_token`` is added to the tokenizer when missing (the embeddings grow with it). Returns the model,
    the tokenizer and the checkpoint's image processor. The feature strategy is the family's (``Family.llava``):
    ``default`` (class token dropped) for CLIP, ``full`` for SigLIP. ``trust_remote_code`` lets the language
    model's folder run its own Python code (off by default).
    """
    parts = load_llava_parts(clip_moe_dir, llm_dir, [image_token], trust_remote_code)
    model = parts.assemble(
        LlavaConfig,
        LlavaForConditionalGeneration,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=parts.family.llava.feature_strategy,
        image_token_index=parts.tokenizer.convert_tokens_to_ids(image_token),
        projector_hidden_act=projector_hidden_act,
    )
    return model, parts.tokenizer, load_image_processor(clip_moe_dir)
