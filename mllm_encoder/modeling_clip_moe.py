"""CLIP-MoE models: HF CLIP's towers with sparse Mixture-of-Experts FFNs, as ``PreTrainedModel``s.

The tower, two-tower and text-transformer skeletons shared with every family are in
:mod:`mllm_encoder.modeling_moe_base`; this file states CLIP's choices: initialisation, the image tower with a
class token and ``pre_layrnorm``, the causal text tower pooled at end-of-text, the projections and the softmax loss.
"""

from typing import Optional

import torch
from torch import nn
from transformers import PreTrainedModel

from mllm_encoder.configuration_clip_moe import CLIPMoEConfig, CLIPMoETextConfig, CLIPMoEVisionConfig
from mllm_encoder.layers import Attention, Encoder, FeedForward, TextEmbeddings, VisionEmbeddings, additive_mask
from mllm_encoder.modeling_moe_base import TextTowerModel, TextTransformer, TwoTowerModel, VisionTowerModel
from mllm_encoder.moe import StackedExperts, TopKRouter
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
    """The image tower: embeddings, ``pre_layrnorm``, encoder, ``post_layernorm`` on the class token.

    ``forward`` takes the arguments of every image tower of the project; SigLIP 2 NaFlex's
    ``pixel_attention_mask`` and ``spatial_shapes`` are refused here (see ``SiglipVisionTransformer``).
    ``output_aux_loss``: see :func:`mllm_encoder.layers.wants_aux_loss`.
    """

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
        pixel_attention_mask: Optional[torch.Tensor] = None,
        spatial_shapes: Optional[torch.Tensor] = None,
        output_aux_loss: Optional[bool] = None,
    ) -> MoEModelOutputWithPooling:
        if pixel_attention_mask is not None or spatial_shapes is not None:
            raise ValueError("spatial_shapes / pixel_attention_mask are SigLIP 2 NaFlex inputs; this is CLIP")
        hidden_states = self.pre_layrnorm(self.embeddings(pixel_values, interpolate_pos_encoding))
        encoded = self.encoder(hidden_states, None, output_hidden_states)
        last = encoded.last_hidden_state
        pooled = self.post_layernorm(last[:, 0, :])
        return encoded.tower_output(last, pooled, self.config.top_k, output_aux_loss=output_aux_loss)


def causal_padding_mask(attention_mask: Optional[torch.Tensor], length: int, dtype, device) -> torch.Tensor:
    """Additive ``[batch or 1, 1, L, L]`` mask: causal, and hiding padded keys when a mask is given."""
    allowed = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :].to(device=device, dtype=torch.bool)
    return additive_mask(allowed, dtype)


class CLIPTextTransformer(TextTransformer):
    """CLIP's text tower: causal, pooled at the end-of-text token (HF CLIP's rule)."""

    def pooled_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Index of the pooled token of each sequence."""
        if self.config.eos_token_id == LEGACY_EOS_TOKEN_ID:
            return input_ids.to(torch.int).argmax(dim=-1)
        return (input_ids == self.config.eos_token_id).int().argmax(dim=-1)

    def attention_bias(
        self, attention_mask: Optional[torch.Tensor], hidden_states: torch.Tensor
    ) -> Optional[torch.Tensor]:
        return causal_padding_mask(attention_mask, hidden_states.shape[1], hidden_states.dtype, hidden_states.device)

    def pool(self, last: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(last.shape[0], device=last.device)
        return last[rows, self.pooled_positions(input_ids).to(last.device)]


class CLIPMoEVisionModel(VisionTowerModel, CLIPMoEPreTrainedModel):
    """The image tower alone (``vision_model.*`` parameters), like HF ``CLIPVisionModel``.

    ``from_pretrained`` accepts a vision-tower directory or a full CLIP / CLIP-MoE directory.
    """

    config_class = CLIPMoEVisionConfig
    tower_class = VisionTransformer
    _keys_to_ignore_on_load_unexpected = [r"^text_model\.", r"^(visual|text)_projection\.", r"^logit_scale"]


class CLIPMoETextModel(TextTowerModel, CLIPMoEPreTrainedModel):
    """The text tower alone (``text_model.*`` parameters), like HF ``CLIPTextModel``."""

    config_class = CLIPMoETextConfig
    tower_class = CLIPTextTransformer
    _keys_to_ignore_on_load_unexpected = [r"^vision_model\.", r"^(visual|text)_projection\.", r"^logit_scale"]


class CLIPMoEModel(TwoTowerModel, CLIPMoEPreTrainedModel):
    """Both towers, their projections and the learnable temperature, like HF ``CLIPModel``; the loss is the
    symmetric contrastive loss."""

    config_class = CLIPMoEConfig
    output_class = CLIPMoEOutput
    loss_kind = "softmax"

    def __init__(self, config: CLIPMoEConfig):
        super().__init__(config)
        self.projection_dim = config.projection_dim
        self.text_embed_dim = config.text_config.hidden_size
        self.vision_embed_dim = config.vision_config.hidden_size
        self.text_model = CLIPTextTransformer(config.text_config)
        self.vision_model = VisionTransformer(config.vision_config)
        self.visual_projection = nn.Linear(self.vision_embed_dim, self.projection_dim, bias=False)
        self.text_projection = nn.Linear(self.text_embed_dim, self.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.post_init()

    def text_embedding(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.text_projection(pooled)

    def image_embedding(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(pooled)
