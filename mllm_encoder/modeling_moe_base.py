"""What every family's models share, as mixins over the family's ``PreTrainedModel`` base: the image-tower,
text-tower and two-tower models, and the text transformer's skeleton. A family's modeling file states only what
differs (its tower transformers, initialisation, embeddings and ``loss_kind``), as transformers' ``modular_*``
files do.
"""

from typing import Optional, Tuple, Type

import torch
from torch import nn
from transformers import PretrainedConfig

from mllm_encoder.layers import Encoder, TextEmbeddings, wants_aux_loss
from mllm_encoder.losses import LOSS_OF_LOGITS
from mllm_encoder.moe import two_tower_aux_losses
from mllm_encoder.outputs import CLIPMoEOutput, MoEModelOutputWithPooling
from mllm_encoder.towers import TEXT, VISION


class TextTransformer(nn.Module):
    """The text tower: embeddings, encoder, ``final_layer_norm``; a family states its ``attention_bias`` (CLIP's
    is causal, SigLIP's bidirectional) and its ``pool``."""

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.config = config
        self.embeddings = TextEmbeddings(config)
        self.encoder = Encoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def attention_bias(
        self, attention_mask: Optional[torch.Tensor], hidden_states: torch.Tensor
    ) -> Optional[torch.Tensor]:
        """The additive attention mask of the encoder (``attention_mask``: 1 = a real token)."""
        raise NotImplementedError

    def pool(self, last: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """``pooler_output`` from the normalised last hidden state."""
        raise NotImplementedError

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        output_hidden_states: bool = False,
        output_aux_loss: Optional[bool] = None,
    ) -> MoEModelOutputWithPooling:
        """``output_aux_loss``: see :func:`mllm_encoder.layers.wants_aux_loss`."""
        hidden_states = self.embeddings(input_ids)
        encoded = self.encoder(hidden_states, self.attention_bias(attention_mask, hidden_states), output_hidden_states)
        last = self.final_layer_norm(encoded.last_hidden_state)
        pooled = self.pool(last, input_ids)
        return encoded.tower_output(last, pooled, self.config.top_k, attention_mask, output_aux_loss)


class TowerModel:
    """Mixin of the one-tower models: the tower transformer (``tower_class``) under ``base_model_prefix``
    (``vision_model`` or ``text_model``, so parameter names are HF's)."""

    base_model_prefix: str
    tower_class: Type[nn.Module]

    def __init__(self, config: PretrainedConfig):
        super().__init__(config)
        setattr(self, self.base_model_prefix, self.tower_class(config))
        self.post_init()


class VisionTowerModel(TowerModel):
    """Mixin of the image-tower models: one tower transformer (``tower_class``) under ``vision_model``.

    ``forward`` ignores keyword arguments it does not know, as HF towers do.
    """

    base_model_prefix = VISION.module
    main_input_name = VISION.input_name

    def get_input_embeddings(self) -> nn.Module:
        return self.vision_model.embeddings.patch_embedding

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: Optional[bool] = None,
        interpolate_pos_encoding: bool = False,
        return_dict: Optional[bool] = None,
        pixel_attention_mask: Optional[torch.Tensor] = None,
        spatial_shapes: Optional[torch.Tensor] = None,
        output_aux_loss: Optional[bool] = None,
        **kwargs,
    ) -> MoEModelOutputWithPooling:
        """Encode images.

        Args:
            pixel_values: ``[batch, channels, height, width]`` (SigLIP 2 NaFlex: see ``SiglipVisionTransformer``).
            output_hidden_states: also return every layer's output (index 0 = embeddings).
            interpolate_pos_encoding: resize the position grid for other image sizes.
            pixel_attention_mask, spatial_shapes: SigLIP 2 NaFlex's patch mask and patch grids (NaFlex only).
            output_aux_loss: compute ``aux_loss``; default: when autograd records
                (:func:`mllm_encoder.layers.wants_aux_loss`), else it is ``None``.
        """
        output = self.vision_model(
            pixel_values,
            bool(output_hidden_states),
            interpolate_pos_encoding,
            pixel_attention_mask=pixel_attention_mask,
            spatial_shapes=spatial_shapes,
            output_aux_loss=output_aux_loss,
        )
        return output if return_dict is not False else output.to_tuple()


class TextTowerModel(TowerModel):
    """Mixin of the text-tower models: one tower transformer (``tower_class``) under ``text_model``."""

    base_model_prefix = TEXT.module

    def get_input_embeddings(self) -> nn.Module:
        return self.text_model.embeddings.token_embedding

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.text_model.embeddings.token_embedding = value

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        output_aux_loss: Optional[bool] = None,
        **kwargs,
    ) -> MoEModelOutputWithPooling:
        """Encode token ids ``[batch, length]`` (``attention_mask`` 1 = real token); ``output_aux_loss``: compute
        ``aux_loss`` (default: when autograd records, :func:`mllm_encoder.layers.wants_aux_loss`)."""
        output = self.text_model(input_ids, attention_mask, bool(output_hidden_states), output_aux_loss)
        return output if return_dict is not False else output.to_tuple()


class TwoTowerModel:
    """Mixin of the two-tower models: ``text_model`` and ``vision_model``, their embeddings (``text_embedding``,
    ``image_embedding``: identity unless overridden), the similarity logits and the family's ``contrastive_loss``
    of those logits (named by ``loss_kind``).
    """

    output_class: Type[CLIPMoEOutput]
    loss_kind: str  # the family's image-text loss: a key of mllm_encoder.losses.LOSS_OF_LOGITS

    def get_input_embeddings(self) -> nn.Module:
        return self.text_model.embeddings.token_embedding

    def text_embedding(self, pooled: torch.Tensor) -> torch.Tensor:
        """The text embedding of the text tower's pooled output."""
        return pooled

    def image_embedding(self, pooled: torch.Tensor) -> torch.Tensor:
        """The image embedding of the image tower's pooled output."""
        return pooled

    def contrastive_loss(self, logits_per_text: torch.Tensor) -> torch.Tensor:
        """The family's image-text loss (``loss_kind``) of the float32 ``[texts, images]`` logits of
        :meth:`similarity_logits`."""
        return LOSS_OF_LOGITS[self.loss_kind](logits_per_text)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None):
        """Unnormalised text embeddings ``[batch, embedding width]``."""
        return self.text_embedding(self.text_model(input_ids, attention_mask, output_aux_loss=False).pooler_output)

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        pixel_attention_mask: Optional[torch.Tensor] = None,
        spatial_shapes: Optional[torch.Tensor] = None,
    ):
        """Unnormalised image embeddings ``[batch, embedding width]`` (``pixel_attention_mask``,
        ``spatial_shapes``: SigLIP 2 NaFlex's inputs)."""
        pooled = self.vision_model(
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            pixel_attention_mask=pixel_attention_mask,
            spatial_shapes=spatial_shapes,
            output_aux_loss=False,
        ).pooler_output
        return self.image_embedding(pooled)

    def similarity_logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Normalise both embeddings in float32 and return ``(logits_per_text, images, texts)``: the float32
        ``[texts, images]`` scaled cosine similarities, plus ``logit_bias`` where the model has one (SigLIP),
        computed once for the outputs and the loss; the normalised embeddings in the input's dtype."""
        image = nn.functional.normalize(image_embeds.float(), dim=-1)
        text = nn.functional.normalize(text_embeds.float(), dim=-1)
        logits_per_text = text @ image.t().to(text.device) * self.logit_scale.exp().float()
        bias = getattr(self, "logit_bias", None)
        if bias is not None:
            logits_per_text = logits_per_text + bias.float()
        # the model's dtype (bf16 for a bf16 model), never below it: under autocast over fp32 weights the
        # projections give bf16, yet the embeddings and logits stay fp32 (as HF CLIP's do)
        dtype = torch.promote_types(text_embeds.dtype, self.logit_scale.dtype)
        return logits_per_text, image.to(dtype), text.to(dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        return_loss: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        interpolate_pos_encoding: bool = False,
        return_dict: Optional[bool] = None,
        pixel_attention_mask: Optional[torch.Tensor] = None,
        spatial_shapes: Optional[torch.Tensor] = None,
        output_aux_loss: Optional[bool] = None,
        **kwargs,
    ) -> CLIPMoEOutput:
        """Forward pass; ``loss`` = ``contrastive_loss`` + ``router_aux_loss_coef`` x load balancing (layer mean).

        ``pixel_attention_mask`` and ``spatial_shapes`` are SigLIP 2 NaFlex's image inputs. ``aux_loss`` is
        computed when ``return_loss`` or ``output_aux_loss`` asks for it, by default when autograd records
        (:func:`mllm_encoder.layers.wants_aux_loss`); otherwise it is ``None``.
        """
        hidden = bool(output_hidden_states)
        output_aux_loss = bool(return_loss) or wants_aux_loss(output_aux_loss)  # the same for both towers
        vision = self.vision_model(
            pixel_values,
            hidden,
            interpolate_pos_encoding,
            pixel_attention_mask=pixel_attention_mask,
            spatial_shapes=spatial_shapes,
            output_aux_loss=output_aux_loss,
        )
        text = self.text_model(input_ids, attention_mask, hidden, output_aux_loss)
        logits_per_text, image_embeds, text_embeds = self.similarity_logits(
            self.image_embedding(vision.pooler_output), self.text_embedding(text.pooler_output)
        )
        aux_loss = loss = None
        if text.aux_loss is not None:
            aux_loss, weighted_aux_loss = two_tower_aux_losses(
                text.aux_loss,
                len(text.router_logits),
                self.config.text_config.router_aux_loss_coef,
                vision.aux_loss,
                len(vision.router_logits),
                self.config.vision_config.router_aux_loss_coef,
            )
        if return_loss:
            loss = self.contrastive_loss(logits_per_text) + weighted_aux_loss
        dtype = text_embeds.dtype
        output = self.output_class(
            loss=loss,
            logits_per_image=logits_per_text.t().to(dtype),
            logits_per_text=logits_per_text.to(dtype),
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            aux_loss=aux_loss,
            router_logits=text.router_logits + vision.router_logits,
            text_model_output=text,
            vision_model_output=vision,
        )
        return output if return_dict is not False else output.to_tuple()
