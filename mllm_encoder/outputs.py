"""Output dataclasses of the CLIP-MoE models."""

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from transformers.utils import ModelOutput


@dataclass
class MoEModelOutputWithPooling(ModelOutput):
    """Output of one tower.

    Args:
        last_hidden_state: ``[batch, tokens, hidden]``, the last computed layer's output (the text tower
            applies its final LayerNorm, the image tower does not, as in HF CLIP).
        pooler_output: ``[batch, hidden]``, the pooled token after the final LayerNorm.
        hidden_states: when asked, index 0 = the embeddings (after ``pre_layrnorm`` for images), index i =
            the output of layer i.
        router_logits: one ``[tokens, num_experts]`` tensor per MoE layer (empty for a dense tower).
        aux_loss: the unweighted load-balancing loss averaged over the MoE layers (0 for a dense tower; 1 when
            routing is uniform); ``None`` when not computed (see ``mllm_encoder.layers.wants_aux_loss``).
    """

    last_hidden_state: Optional[torch.FloatTensor] = None
    pooler_output: Optional[torch.FloatTensor] = None
    hidden_states: Optional[Tuple[torch.FloatTensor, ...]] = None
    router_logits: Optional[Tuple[torch.FloatTensor, ...]] = None
    aux_loss: Optional[torch.FloatTensor] = None


@dataclass
class CLIPMoEOutput(ModelOutput):
    """Output of the two-tower ``CLIPMoEModel``.

    Args:
        loss: when ``return_loss``: the symmetric contrastive loss plus ``router_aux_loss_coef * aux_loss``.
        logits_per_image: ``[images, texts]`` scaled cosine similarities; ``logits_per_text`` its transpose.
        text_embeds, image_embeds: normalised projected embeddings.
        aux_loss: the unweighted load-balancing loss averaged over the MoE layers of both towers (the paper's
            ``1 / (A + B)`` weighting); ``None`` when not computed (no ``return_loss``, no ``output_aux_loss``,
            autograd off).
        router_logits: the router logits of the text tower's MoE layers, then the image tower's.
        text_model_output, vision_model_output: the towers' own outputs.
    """

    loss: Optional[torch.FloatTensor] = None
    logits_per_image: Optional[torch.FloatTensor] = None
    logits_per_text: Optional[torch.FloatTensor] = None
    text_embeds: Optional[torch.FloatTensor] = None
    image_embeds: Optional[torch.FloatTensor] = None
    aux_loss: Optional[torch.FloatTensor] = None
    router_logits: Optional[Tuple[torch.FloatTensor, ...]] = None
    text_model_output: Optional[MoEModelOutputWithPooling] = None
    vision_model_output: Optional[MoEModelOutputWithPooling] = None

    def to_tuple(self) -> Tuple:
        return tuple(
            self[k] if k not in ("text_model_output", "vision_model_output") else getattr(self, k).to_tuple()
            for k in self.keys()
        )


@dataclass
class SiglipMoEOutput(CLIPMoEOutput):
    """Output of the two-tower ``SiglipMoEModel``: the fields of :class:`CLIPMoEOutput`, where ``loss`` is the
    sigmoid loss plus the weighted load balancing, and ``logits_per_text`` is
    ``logit_scale.exp() * cosine + logit_bias`` (apply ``sigmoid`` for match probabilities)."""
