"""Reusable transformer layers of the CLIP and SigLIP towers (HF parameter names), with MoE FFNs."""

import math
import re
from typing import NamedTuple, Optional, Tuple

import torch
from torch import nn
from transformers.activations import ACT2FN

from mllm_encoder.configuration_moe_base import MoETowerConfig
from mllm_encoder.moe import SparseMoE, mean_load_balancing_loss
from mllm_encoder.outputs import MoEModelOutputWithPooling

LayerOutput = Tuple[torch.Tensor, Optional[torch.Tensor]]


class VisionEmbeddings(nn.Module):
    """Conv patch embedding, an optional class token and learned position embeddings.

    ``class_token``: prepend a learned class token (CLIP) or not (SigLIP); ``patch_bias``: the patch
    convolution has a bias (SigLIP) or not (CLIP).
    """

    def __init__(self, config: MoETowerConfig, class_token: bool = True, patch_bias: bool = False):
        super().__init__()
        self.patch_size = config.patch_size
        self.num_prefix_tokens = int(class_token)
        if class_token:
            self.class_embedding = nn.Parameter(torch.randn(config.hidden_size))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, config.patch_size, stride=config.patch_size, bias=patch_bias
        )
        self.num_patches = (config.image_size // config.patch_size) ** 2
        self.position_embedding = nn.Embedding(self.num_patches + self.num_prefix_tokens, config.hidden_size)

    def _positions(self, height: int, width: int, interpolate: bool) -> torch.Tensor:
        table = self.position_embedding.weight
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        if grid_h * grid_w == self.num_patches:
            return table
        if not interpolate:
            raise ValueError(
                f"input image size ({height}x{width}) does not match the model's "
                f"{self.num_patches} patches; pass interpolate_pos_encoding=True to resize the position grid"
            )
        prefix = self.num_prefix_tokens
        side = int(self.num_patches**0.5)
        grid = table[prefix:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = nn.functional.interpolate(grid.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        grid = grid.to(table.dtype).permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1)
        return torch.cat([table[:prefix], grid])

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype)).flatten(2).transpose(1, 2)
        positions = self._positions(pixel_values.shape[-2], pixel_values.shape[-1], interpolate_pos_encoding)
        if self.num_prefix_tokens:
            cls = self.class_embedding.to(dtype).expand(patches.shape[0], 1, -1)
            patches = torch.cat([cls, patches], dim=1)
        return patches + positions.unsqueeze(0)


class NaFlexVisionEmbeddings(nn.Module):
    """SigLIP 2 NaFlex: a linear embedding of flattened patches plus the learned square position grid resized
    (bilinear, antialiased) to each image's patch grid; the rows past an image's patches are padding.

    ``forward(pixel_values [B, N, C * P * P], spatial_shapes [B, 2]) -> [B, N, D]``; ``spatial_shapes`` holds
    each image's patch grid (rows, columns).
    """

    def __init__(self, config):
        super().__init__()
        self.patch_embedding = nn.Linear(config.num_channels * config.patch_size**2, config.hidden_size)
        self.position_embedding = nn.Embedding(config.num_patches, config.hidden_size)
        self.grid_side = math.isqrt(config.num_patches)

    def _positions(self, spatial_shapes: torch.Tensor, length: int) -> torch.Tensor:
        table = self.position_embedding.weight
        grid = table.reshape(self.grid_side, self.grid_side, -1).permute(2, 0, 1).unsqueeze(0).float()
        rows = []
        for height, width in spatial_shapes.tolist():
            if not 0 < height * width <= length:
                raise ValueError(f"spatial_shapes: a {height}x{width} patch grid does not fit {length} patch rows")
            resized = nn.functional.interpolate(
                grid, size=(height, width), mode="bilinear", align_corners=False, antialias=True
            )
            resized = resized[0].flatten(1).t()
            rows.append(torch.cat([resized, resized[:1].expand(length - resized.shape[0], -1)]))
        return torch.stack(rows).to(table.dtype)

    def forward(self, pixel_values: torch.Tensor, spatial_shapes: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        return patches + self._positions(spatial_shapes, pixel_values.shape[1])


class TextEmbeddings(nn.Module):
    """Token and learned absolute position embeddings."""

    def __init__(self, config: MoETowerConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[-1]
        if length > self.position_embedding.num_embeddings:
            raise ValueError(
                f"input_ids has {length} tokens, more than max_position_embeddings="
                f"{self.position_embedding.num_embeddings}"
            )
        return self.token_embedding(input_ids) + self.position_embedding.weight[:length]


class Attention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention``."""

    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.dropout = config.attention_dropout
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``attention_mask``: additive, broadcastable to ``[batch, heads, queries, keys]``."""
        batch, length, width = hidden_states.shape
        attended = nn.functional.scaled_dot_product_attention(
            self._heads(self.q_proj(hidden_states)),
            self._heads(self.k_proj(hidden_states)),
            self._heads(self.v_proj(hidden_states)),
            attn_mask=attention_mask,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out_proj(attended.transpose(1, 2).reshape(batch, length, width))


class FeedForward(nn.Module):
    """The dense CLIP MLP (fc1 -> activation -> fc2); returns no router logits."""

    def __init__(self, config):
        super().__init__()
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> LayerOutput:
        return self.fc2(self.activation_fn(self.fc1(hidden_states))), None


class AttentionPoolingHead(nn.Module):
    """Multihead attention pooling (SigLIP's ``head``): a learned probe attends over every token, then a
    residual MLP; returns ``[batch, hidden]``."""

    def __init__(self, config):
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, config.hidden_size))
        self.attention = nn.MultiheadAttention(config.hidden_size, config.num_attention_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = FeedForward(config)

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``attention_mask`` ``[batch, tokens]``, 1 = a token to pool (SigLIP 2 NaFlex padding is 0)."""
        probe = self.probe.expand(hidden_states.shape[0], -1, -1)
        ignored = None if attention_mask is None else ~attention_mask.to(torch.bool)
        pooled = self.attention(probe, hidden_states, hidden_states, key_padding_mask=ignored, need_weights=False)[0]
        return (pooled + self.mlp(self.layernorm(pooled))[0])[:, 0]


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive attention mask of the boolean ``allowed``: 0 where allowed, ``dtype``'s minimum elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def key_padding_mask(attention_mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Additive ``[batch, 1, 1, L]`` mask hiding padded keys (``attention_mask`` 1 = real token), or ``None``."""
    if attention_mask is None:
        return None
    return additive_mask(attention_mask[:, None, None, :].to(torch.bool), dtype)


ENCODER_FFN_PARAMETER = re.compile(r"(^|\.)layers\.\d+\.mlp\.")


def is_encoder_ffn_parameter(name: str) -> bool:
    """Whether parameter ``name`` belongs to an encoder layer's FFN (dense, or MoE with its router); SigLIP's
    pooling-head MLP (``head.mlp``) does not."""
    return ENCODER_FFN_PARAMETER.search(name) is not None


def build_ffn(config, layer_index: int) -> nn.Module:
    """The FFN of layer ``layer_index``: a ``SparseMoE`` if the config makes it MoE, else a dense MLP."""
    if not config.is_moe_layer(layer_index):
        return FeedForward(config)
    return SparseMoE(
        config.hidden_size,
        config.intermediate_size,
        config.num_experts,
        config.top_k,
        hidden_act=config.hidden_act,
        norm_topk_prob=config.norm_topk_prob,
    )


class EncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block: attention then (MoE) FFN, each with a residual."""

    def __init__(self, config, layer_index: int):
        super().__init__()
        self.self_attn = Attention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = build_ffn(config, layer_index)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> LayerOutput:
        hidden_states = hidden_states + self.self_attn(self.layer_norm1(hidden_states), attention_mask)
        ffn_output, router_logits = self.mlp(self.layer_norm2(hidden_states))
        return hidden_states + ffn_output, router_logits


class EncoderOutput(NamedTuple):
    """What :class:`Encoder` returns: the last state, every state when asked, and the router logits."""

    last_hidden_state: torch.Tensor
    hidden_states: Optional[Tuple[torch.Tensor, ...]]
    router_logits: Tuple[torch.Tensor, ...]

    def tower_output(
        self,
        last_hidden_state: torch.Tensor,
        pooler_output: Optional[torch.Tensor],
        top_k: int,
        token_mask: Optional[torch.Tensor] = None,
        output_aux_loss: Optional[bool] = None,
    ) -> MoEModelOutputWithPooling:
        """A tower's output: its ``last_hidden_state`` (this one after the tower's final LayerNorm, if any) and
        ``pooler_output``, these states and router logits, and, when :func:`wants_aux_loss`, the layer-mean
        load-balancing loss over the tokens of ``token_mask`` (1 = a real token; ``None``: all)."""
        aux_loss = None
        if wants_aux_loss(output_aux_loss):
            aux_loss = mean_load_balancing_loss(
                self.router_logits, top_k, token_mask=token_mask, device=last_hidden_state.device
            )
        return MoEModelOutputWithPooling(
            last_hidden_state=last_hidden_state,
            pooler_output=pooler_output,
            hidden_states=self.hidden_states,
            router_logits=self.router_logits,
            aux_loss=aux_loss,
        )


def wants_aux_loss(output_aux_loss: Optional[bool]) -> bool:
    """Whether a tower computes its load-balancing loss: ``output_aux_loss`` when given, else whenever autograd
    records (a loss there may be backpropagated); under ``torch.no_grad`` / ``torch.inference_mode`` it is
    skipped and ``aux_loss`` is ``None``."""
    return torch.is_grad_enabled() if output_aux_loss is None else bool(output_aux_loss)


class Encoder(nn.Module):
    """A stack of :class:`EncoderLayer` with optional gradient checkpointing."""

    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False

    def _run_layer(self, layer: EncoderLayer, hidden_states: torch.Tensor, mask: Optional[torch.Tensor]):
        if self.gradient_checkpointing and self.training:
            checkpoint = getattr(self, "_gradient_checkpointing_func", None)
            if checkpoint is None:
                return torch.utils.checkpoint.checkpoint(layer, hidden_states, mask, use_reentrant=False)
            return checkpoint(layer.__call__, hidden_states, mask)
        return layer(hidden_states, mask)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        output_hidden_states: bool = False,
    ) -> EncoderOutput:
        """Run every layer (a shorter encoder is a config with fewer ``num_hidden_layers``)."""
        states = [hidden_states] if output_hidden_states else None
        router_logits = []
        for layer in self.layers:
            hidden_states, logits = self._run_layer(layer, hidden_states, attention_mask)
            if logits is not None:
                router_logits.append(logits)
            if states is not None:
                states.append(hidden_states)
        return EncoderOutput(hidden_states, tuple(states) if states is not None else None, tuple(router_logits))
