"""SigLIP-MoE and SigLIP 2-MoE models: HF SigLIP's / SigLIP 2's towers with sparse MoE FFNs.

Built from the layers (``mllm_encoder.layers``) and the tower / two-tower skeletons
(``mllm_encoder.modeling_moe_base``) every family shares; SigLIP's differences from CLIP are these choices: no
class token and a conv patch embedding with bias, no LayerNorm before the encoder, the image tower normalises
every token and pools with a multihead-attention head, the text tower is bidirectional (padding mask only) and
pools its last token through a linear ``head``, and the loss is the sigmoid loss with a learnable
``logit_scale`` and ``logit_bias``. SigLIP 2 NaFlex differs from SigLIP in one more choice, the
image input (``config.naflex``): flattened patches through a linear embedding, a position grid resized per
image (``spatial_shapes``) and a patch mask (``pixel_attention_mask``) in attention and pooling. Parameter
names are HF's, so dense weights load unchanged.
"""

import math
from typing import Optional

import torch
from torch import nn
from transformers import PreTrainedModel

from mllm_encoder.configuration_siglip_moe import (
    Siglip2MoEConfig,
    Siglip2MoETextConfig,
    Siglip2MoEVisionConfig,
    SiglipMoEConfig,
    SiglipMoETextConfig,
    SiglipMoEVisionConfig,
)
from mllm_encoder.layers import (
    Attention,
    AttentionPoolingHead,
    Encoder,
    FeedForward,
    NaFlexVisionEmbeddings,
    TextEmbeddings,
    VisionEmbeddings,
    key_padding_mask,
)
from mllm_encoder.modeling_moe_base import TextTowerModel, TextTransformer, TwoTowerModel, VisionTowerModel
from mllm_encoder.moe import StackedExperts, TopKRouter
from mllm_encoder.outputs import MoEModelOutputWithPooling, SiglipMoEOutput

# Initialisers act on the parameters themselves, never on views: transformers 5.x skips parameters it has
# loaded by a flag on the parameter, which a view does not carry.


def _lecun_normal_(weight: torch.Tensor) -> None:
    """LeCun normal: N(0, 1 / fan_in), fan_in = one output unit's inputs (a linear row, a conv filter)."""
    nn.init.normal_(weight, std=weight[0].numel() ** -0.5)


def _xavier_uniform_(weight: torch.Tensor) -> None:
    """Xavier uniform of a ``[out, in]`` matrix, or of each matrix of a stacked ``[E, out, in]`` tensor."""
    fan_out, fan_in = weight.shape[-2:]
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    nn.init.uniform_(weight, -bound, bound)


class SiglipMoEPreTrainedModel(PreTrainedModel):
    """Weight initialisation (HF SigLIP's scheme, extended to experts and routers) and common settings."""

    config_class = SiglipMoEConfig
    base_model_prefix = "siglip"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = [
        "EncoderLayer",
        "VisionEmbeddings",
        "NaFlexVisionEmbeddings",
        "TextEmbeddings",
        "AttentionPoolingHead",
    ]

    def _init_weights(self, module: nn.Module) -> None:
        tower = getattr(self.config, "vision_config", self.config)
        if isinstance(module, (VisionEmbeddings, NaFlexVisionEmbeddings)):
            nn.init.normal_(module.position_embedding.weight, std=tower.hidden_size**-0.5)
            _lecun_normal_(module.patch_embedding.weight)
            nn.init.zeros_(module.patch_embedding.bias)
        elif isinstance(module, TextEmbeddings):
            for embedding in (module.token_embedding, module.position_embedding):
                nn.init.normal_(embedding.weight, std=embedding.weight.shape[-1] ** -0.5)
        elif isinstance(module, Attention):
            for proj in (module.q_proj, module.k_proj, module.v_proj, module.out_proj):
                _xavier_uniform_(proj.weight)
                nn.init.zeros_(proj.bias)
        elif isinstance(module, (FeedForward, StackedExperts)):
            for linear in (module.fc1, module.fc2):
                _xavier_uniform_(linear.weight)
                nn.init.normal_(linear.bias, std=1e-6)
        elif isinstance(module, TopKRouter):
            nn.init.normal_(module.weight, std=module.weight.shape[-1] ** -0.5)
        elif isinstance(module, AttentionPoolingHead):
            nn.init.xavier_uniform_(module.probe)
            _xavier_uniform_(module.attention.in_proj_weight)
            nn.init.zeros_(module.attention.in_proj_bias)
        elif isinstance(module, SiglipTextTransformer):
            _lecun_normal_(module.head.weight)
            nn.init.zeros_(module.head.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, SiglipMoEModel):
            nn.init.constant_(module.logit_scale, self.config.logit_scale_init_value)
            nn.init.constant_(module.logit_bias, self.config.logit_bias_init_value)


class SiglipVisionTransformer(nn.Module):
    """The image tower: embeddings (no class token), encoder, ``post_layernorm`` on every token, ``head``.

    SigLIP reads images ``[batch, channels, height, width]``; SigLIP 2 NaFlex (``config.naflex``) reads flattened
    patches ``[batch, patches, channels * patch_size**2]`` with ``spatial_shapes`` ``[batch, 2]`` (each image's
    patch grid) and ``pixel_attention_mask`` ``[batch, patches]`` (1 = a real patch). ``output_aux_loss``: see
    :func:`mllm_encoder.layers.wants_aux_loss`.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        if config.naflex:
            self.embeddings = NaFlexVisionEmbeddings(config)
        else:
            self.embeddings = VisionEmbeddings(config, class_token=False, patch_bias=True)
        self.encoder = Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.head = AttentionPoolingHead(config) if config.vision_use_head else None

    def _embed(self, pixel_values, interpolate_pos_encoding, pixel_attention_mask, spatial_shapes) -> torch.Tensor:
        if not self.config.naflex:
            if spatial_shapes is not None or pixel_attention_mask is not None:
                raise ValueError("spatial_shapes / pixel_attention_mask are SigLIP 2 NaFlex inputs; this is SigLIP")
            return self.embeddings(pixel_values, interpolate_pos_encoding)
        if spatial_shapes is None or pixel_values.ndim != 3:
            raise ValueError(
                "a SigLIP 2 NaFlex image tower takes pixel_values [batch, patches, channels * patch_size**2] "
                f"and spatial_shapes [batch, 2]; got pixel_values {tuple(pixel_values.shape)}"
                + (" and no spatial_shapes" if spatial_shapes is None else "")
            )
        return self.embeddings(pixel_values, spatial_shapes)

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool = False,
        pixel_attention_mask: Optional[torch.Tensor] = None,
        spatial_shapes: Optional[torch.Tensor] = None,
        output_aux_loss: Optional[bool] = None,
    ) -> MoEModelOutputWithPooling:
        hidden_states = self._embed(pixel_values, interpolate_pos_encoding, pixel_attention_mask, spatial_shapes)
        mask = key_padding_mask(pixel_attention_mask, hidden_states.dtype)
        encoded = self.encoder(hidden_states, mask, output_hidden_states)
        last = self.post_layernorm(encoded.last_hidden_state)
        pooled = self.head(last, pixel_attention_mask) if self.head is not None else None
        return encoded.tower_output(last, pooled, self.config.top_k, pixel_attention_mask, output_aux_loss)


class SiglipTextTransformer(TextTransformer):
    """The bidirectional text tower (padding mask only); the pooled token is the last one (SigLIP pads to a
    fixed length), through a linear ``head``."""

    def __init__(self, config: SiglipMoETextConfig):
        super().__init__(config)
        self.head = nn.Linear(config.hidden_size, config.projection_size)

    def attention_bias(
        self, attention_mask: Optional[torch.Tensor], hidden_states: torch.Tensor
    ) -> Optional[torch.Tensor]:
        return key_padding_mask(attention_mask, hidden_states.dtype)

    def pool(self, last: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(last[:, -1, :])


class SiglipMoEVisionModel(VisionTowerModel, SiglipMoEPreTrainedModel):
    """The image tower alone (``vision_model.*`` parameters), like HF ``SiglipVisionModel``.

    ``from_pretrained`` accepts a vision-tower directory or a full SigLIP / SigLIP-MoE directory.
    """

    config_class = SiglipMoEVisionConfig
    tower_class = SiglipVisionTransformer
    _keys_to_ignore_on_load_unexpected = [r"^text_model\.", r"^logit_(scale|bias)"]


class SiglipMoETextModel(TextTowerModel, SiglipMoEPreTrainedModel):
    """The text tower alone (``text_model.*`` parameters), like HF ``SiglipTextModel``."""

    config_class = SiglipMoETextConfig
    tower_class = SiglipTextTransformer
    _keys_to_ignore_on_load_unexpected = [r"^vision_model\.", r"^logit_(scale|bias)"]


class SiglipMoEModel(TwoTowerModel, SiglipMoEPreTrainedModel):
    """Both towers and the sigmoid loss's learnable ``logit_scale`` and ``logit_bias``, like HF ``SiglipModel``.

    The image embedding is the vision head's output, the text embedding the text ``head``'s (no projections);
    ``forward`` also takes SigLIP 2 NaFlex's ``pixel_attention_mask`` and ``spatial_shapes``.
    """

    config_class = SiglipMoEConfig
    output_class = SiglipMoEOutput
    loss_kind = "sigmoid"

    def __init__(self, config: SiglipMoEConfig):
        super().__init__(config)
        self.text_model = SiglipTextTransformer(config.text_config)
        self.vision_model = SiglipVisionTransformer(config.vision_config)
        self.logit_scale = nn.Parameter(torch.full((1,), config.logit_scale_init_value))
        self.logit_bias = nn.Parameter(torch.full((1,), config.logit_bias_init_value))
        self.post_init()


class Siglip2MoEVisionModel(SiglipMoEVisionModel):
    """The SigLIP 2 NaFlex image tower alone, like HF ``Siglip2VisionModel`` (call with ``pixel_values``,
    ``pixel_attention_mask`` and ``spatial_shapes``)."""

    config_class = Siglip2MoEVisionConfig


class Siglip2MoETextModel(SiglipMoETextModel):
    """The SigLIP 2 text tower alone, like HF ``Siglip2TextModel``."""

    config_class = Siglip2MoETextConfig


class Siglip2MoEModel(SiglipMoEModel):
    """Both SigLIP 2 NaFlex towers and the sigmoid loss, like HF ``Siglip2Model``."""

    config_class = Siglip2MoEConfig
