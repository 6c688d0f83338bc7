"""Auxiliary losses of the MoE layers."""

from typing import Optional, Sequence, Tuple

import torch

from mllm_encoder.moe.router import route


def load_balancing_loss(
    router_logits: torch.Tensor, top_k: int, token_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Switch/Mixtral load-balancing loss of one layer: ``E * sum_e f_e * P_e``.

    ``f_e`` is the fraction of the token-slots (tokens x k) routed to expert e and ``P_e`` the mean router
    probability of e. It equals 1 when routing is uniform. Computed in float32.

    Args:
        router_logits: ``[T, E]``.
        top_k: experts per token.
        token_mask: optional ``[T]`` (bool or 0/1) marking the tokens that count (text padding does not).
    """
    num_experts = router_logits.shape[-1]
    probs, _, selected = route(router_logits, top_k, norm_topk_prob=False)
    routed = torch.zeros_like(probs).scatter_(1, selected, 1.0)
    if token_mask is None:
        token_weight = torch.ones_like(probs[:, 0])
    else:
        token_weight = token_mask.reshape(-1).to(probs.dtype)
    num_tokens = token_weight.sum().clamp(min=1.0)
    slot_fraction = (routed * token_weight[:, None]).sum(0) / (num_tokens * top_k)
    mean_prob = (probs * token_weight[:, None]).sum(0) / num_tokens
    return num_experts * torch.sum(slot_fraction * mean_prob)


def mean_load_balancing_loss(
    router_logits: Sequence[torch.Tensor],
    top_k: int,
    token_mask: Optional[torch.Tensor] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Mean of :func:`load_balancing_loss` over the MoE layers (a 0 tensor when there are none).

    The paper's Eq. 6 weighs the Switch loss by ``1 / (A + B)`` over the A + B MoE layers of both towers, so
    a tower's ``aux_loss`` is this layer mean: exactly 1.0 under uniform routing whatever the depth, and
    ``alpha * aux_loss`` (alpha = 0.01) keeps the same weight for any number of MoE layers.
    """
    if not router_logits:
        return torch.zeros((), device=device, dtype=torch.float32)
    total = sum(load_balancing_loss(logits, top_k, token_mask) for logits in router_logits)
    return total / len(router_logits)


def two_tower_aux_losses(
    text_aux: torch.Tensor,
    num_text: int,
    text_coef: float,
    vision_aux: torch.Tensor,
    num_vision: int,
    vision_coef: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(aux_loss, weighted)`` of a two-tower model from its towers' layer-mean losses.

    ``aux_loss`` is the mean over all A + B MoE layers of both towers (the paper's Eq. 6); ``weighted`` is the
    same mean with each tower's layers weighted by that tower's ``router_aux_loss_coef``: the term added to
    the contrastive loss.
    """
    layers = max(num_text + num_vision, 1)
    vision_aux = vision_aux.to(text_aux.device)
    aux_loss = (num_text * text_aux + num_vision * vision_aux) / layers
    weighted = (text_coef * num_text * text_aux + vision_coef * num_vision * vision_aux) / layers
    return aux_loss, weighted
