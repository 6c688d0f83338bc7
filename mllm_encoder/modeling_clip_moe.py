"""CLIP-MoE models: HF CLIP's towers with sparse Mixture-of-Experts FFNs, as ``PreTrainedModel``s."""

from typing import Optional, Tuple

import torch
from torch import nn
from transformers import PreTrainedModel

from mllm_encoder.configuration_clip_moe import CLIPMoEConfig, CLIPMoETextConfig, CLIPMoEVisionConfig
from mllm_encoder.layers import Attention, Encoder, FeedForward, TextEmbeddings, VisionEmbeddings
from mllm_encoder.losses import clip_contrastive_loss
from mllm_encoder.moe import StackedExperts, TopKRouter, mean_load_balancing_loss, two_tower_aux_losses
from mllm_encoder.outputs import CLIPMoEOutput, MoEModelOutputWithPooling

LEGACY_EOS_TOKEN_ID = 2


class CLIPMoEPreTrainedModel(PreTrainedModel):
    """Weight initialisation (HF CLIP's scheme, extended to experts and routers) and common settings."""

    config_class = CLIPMoEConfig
    base_model_prefix = "clip"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["EncoderLayer", "VisionEmbeddings", "TextEmbeddings"]

    def _init_weights(self, module: nn.Module) -> None:
        config = self.config
        factor = getattr(config, "initializer_factor", 1.0)
        tower = getattr(config, "vision_config", config)
        width = tower.hidden_size
        depth = tower.num_hidden_layers
        if isinstance(module, VisionEmbeddings):
            nn.init.normal_(module.class_embedding, std=width**-0.5 * factor)
            nn.init.normal_(module.patch_embedding.weight, std=tower.initializer_range * factor)
            nn.init.normal_(module.position_embedding.weight, std=tower.initializer_range * factor)
        elif isinstance(module, TextEmbeddings):
            nn.init.normal_(module.token_embedding.weight, std=0.02 * factor)
            nn.init.normal_(module.position_embedding.weight, std=0.02 * factor)
        elif isinstance(module, Attention):
            in_std = width**-0.5 * (2 * depth) ** -0.5 * factor
            for proj in (module.q_proj, module.k_proj, module.v_proj):
                nn.init.normal_(proj.weight, std=in_std)
            nn.init.normal_(module.out_proj.weight, std=width**-0.5 * factor)
        elif isinstance(module, (FeedForward, StackedExperts)):
            self._init_ffn(module, width, depth, factor)
        elif isinstance(module, TopKRouter):
            nn.init.normal_(module.weight, std=width**-0.5 * factor)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, CLIPMoEModel):
            nn.init.normal_(module.text_projection.weight, std=module.text_embed_dim**-0.5 * factor)
            nn.init.normal_(module.visual_projection.weight, std=module.vision_embed_dim**-0.5 * factor)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @staticmethod
    def _init_ffn(module: nn.Module, width: int, depth: int, factor: float) -> None:
        nn.init.normal_(module.fc1.weight, std=(2 * width) ** -0.5 * factor)
        nn.init.normal_(module.fc2.weight, std=width**-0.5 * (2 * depth) ** -0.5 * factor)
        if isinstance(module, StackedExperts):
            nn.init.zeros_(module.fc1.bias)
            nn.init.zeros_(module.fc2.bias)


class VisionTransformer(nn.Module):
    """The image tower: embeddings, ``pre_layrnorm``, encoder, ``post_layernorm`` on the class token."""

    def __init__(self, config: CLIPMoEVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool = False,
    ) -> MoEModelOutputWithPooling:
        hidden_states = self.pre_layrnorm(self.embeddings(pixel_values, interpolate_pos_encoding))
        encoded = self.encoder(hidden_states, None, output_hidden_states)
        last = encoded.last_hidden_state
        return MoEModelOutputWithPooling(
            last_hidden_state=last,
            pooler_output=self.post_layernorm(last[:, 0, :]),
            hidden_states=encoded.hidden_states,
            router_logits=encoded.router_logits,
            aux_loss=mean_load_balancing_loss(encoded.router_logits, self.config.top_k, device=last.device),
        )


def causal_padding_mask(attention_mask: Optional[torch.Tensor], length: int, dtype, device) -> torch.Tensor:
    """Additive ``[batch or 1, 1, L, L]`` mask: causal, and hiding padded keys when a mask is given."""
    allowed = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :].to(device=device, dtype=torch.bool)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


class TextTransformer(nn.Module):
    """The causal text tower; the pooled token is the end-of-text token (HF CLIP's rule)."""

    def __init__(self, config: CLIPMoETextConfig):
        super().__init__()
        self.config = config
        self.embeddings = TextEmbeddings(config)
        self.encoder = Encoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def pooled_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Index of the pooled token of each sequence."""
        if self.config.eos_token_id == LEGACY_EOS_TOKEN_ID:
            return input_ids.to(torch.int).argmax(dim=-1)
        return (input_ids == self.config.eos_token_id).int().argmax(dim=-1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        output_hidden_states: bool = False,
    ) -> MoEModelOutputWithPooling:
        hidden_states = self.embeddings(input_ids)
        mask = causal_padding_mask(attention_mask, input_ids.shape[-1], hidden_states.dtype, hidden_states.device)
        encoded = self.encoder(hidden_states, mask, output_hidden_states)
        last = self.final_layer_norm(encoded.last_hidden_state)
        rows = torch.arange(last.shape[0], device=last.device)
        return MoEModelOutputWithPooling(
            last_hidden_state=last,
            pooler_output=last[rows, self.pooled_positions(input_ids).to(last.device)],
            hidden_states=encoded.hidden_states,
            router_logits=encoded.router_logits,
            aux_loss=mean_load_balancing_loss(
                encoded.router_logits, self.config.top_k, token_mask=attention_mask, device=last.device
            ),
        )


class CLIPMoEVisionModel(CLIPMoEPreTrainedModel):
    """The image tower alone (``vision_model.*`` parameters), like HF ``CLIPVisionModel``.

    ``from_pretrained`` accepts a vision-tower directory or a full CLIP / CLIP-MoE directory.
    """

    config_class = CLIPMoEVisionConfig
    base_model_prefix = "vision_model"
    main_input_name = "pixel_values"
    _keys_to_ignore_on_load_unexpected = [r"^text_model\.", r"^(visual|text)_projection\.", r"^logit_scale"]

    def __init__(self, config: CLIPMoEVisionConfig):
        super().__init__(config)
        self.vision_model = VisionTransformer(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.vision_model.embeddings.patch_embedding

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: Optional[bool] = None,
        interpolate_pos_encoding: bool = False,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> MoEModelOutputWithPooling:
        """Encode images.

        Args:
            pixel_values: ``[batch, channels, height, width]``.
            output_hidden_states: also return every layer's output (index 0 = embeddings).
            interpolate_pos_encoding: resize the position grid for other image sizes.
        """
        output = self.vision_model(pixel_values, bool(output_hidden_states), interpolate_pos_encoding)
        return output if return_dict is not False else output.to_tuple()


class CLIPMoETextModel(CLIPMoEPreTrainedModel):
    """The text tower alone (``text_model.*`` parameters), like HF ``CLIPTextModel``."""

    config_class = CLIPMoETextConfig
    base_model_prefix = "text_model"
    _keys_to_ignore_on_load_unexpected = [r"^vision_model\.", r"^(visual|text)_projection\.", r"^logit_scale"]

    def __init__(self, config: CLIPMoETextConfig):
        super().__init__(config)
        self.text_model = TextTransformer(config)
        self.post_init()

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
        **kwargs,
    ) -> MoEModelOutputWithPooling:
        """Encode token ids ``[batch, length]`` (``attention_mask`` 1 = real token)."""
        output = self.text_model(input_ids, attention_mask, bool(output_hidden_states))
        return output if return_dict is not False else output.to_tuple()


class CLIPMoEModel(CLIPMoEPreTrainedModel):
    """Both towers, their projections and the learnable temperature, like HF ``CLIPModel``."""

    config_class = CLIPMoEConfig

    def __init__(self, config: CLIPMoEConfig):
        super().__init__(config)
        self.projection_dim = config.projection_dim
        self.text_embed_dim = config.text_config.hidden_size
        self.vision_embed_dim = config.vision_config.hidden_size
        self.text_model = TextTransformer(config.text_config)
        self.vision_model = VisionTransformer(config.vision_config)
        self.visual_projection = nn.Linear(self.vision_embed_dim, self.projection_dim, bias=False)
        self.text_projection = nn.Linear(self.text_embed_dim, self.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.text_model.embeddings.token_embedding

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None):
        """Projected, unnormalised text embeddings ``[batch, projection_dim]``."""
        return self.text_projection(self.text_model(input_ids, attention_mask).pooler_output)

    def get_image_features(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False):
        """Projected, unnormalised image embeddings ``[batch, projection_dim]``."""
        pooled = self.vision_model(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding).pooler_output
        return self.visual_projection(pooled)

    def similarity_logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Normalise both embeddings and return ``(logits_per_image, logits_per_text, images, texts)``."""
        image_embeds = image_embeds / image_embeds.norm(p=2, dim=-1, keepdim=True)
        text_embeds = text_embeds / text_embeds.norm(p=2, dim=-1, keepdim=True)
        logits_per_text = text_embeds @ image_embeds.t().to(text_embeds.device) * self.logit_scale.exp()
        return logits_per_text.t(), logits_per_text, image_embeds, text_embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        return_loss: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        interpolate_pos_encoding: bool = False,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> CLIPMoEOutput:
        """Contrastive forward pass; ``loss`` = CLIP loss + ``router_aux_loss_coef`` x load balancing."""
        hidden = bool(output_hidden_states)
        vision = self.vision_model(pixel_values, hidden, interpolate_pos_encoding)
        text = self.text_model(input_ids, attention_mask, hidden)
        per_image, per_text, image_embeds, text_embeds = self.similarity_logits(
            self.visual_projection(vision.pooler_output), self.text_projection(text.pooler_output)
        )
        aux_loss, weighted_aux_loss = two_tower_aux_losses(
            text.aux_loss,
            len(text.router_logits),
            self.config.text_config.router_aux_loss_coef,
            vision.aux_loss,
            len(vision.router_logits),
            self.config.vision_config.router_aux_loss_coef,
        )
        loss = None
        if return_loss:
            loss = clip_contrastive_loss(image_embeds, text_embeds, self.logit_scale.exp()) + weighted_aux_loss
        output = CLIPMoEOutput(
            loss=loss,
            logits_per_image=per_image,
            logits_per_text=per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            aux_loss=aux_loss,
            router_logits=text.router_logits + vision.router_logits,
            text_model_output=text,
            vision_model_output=vision,
        )
        return output if return_dict is not False else output.to_tuple()
