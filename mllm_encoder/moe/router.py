"""The top-k router: a bias-free linear gate, softmax in float32, top-k, optional renormalisation."""

from typing import NamedTuple, Tuple

import torch
from torch import nn


def route(logits: torch.Tensor, top_k: int, norm_topk_prob: bool = True) -> Tuple[torch.Tensor, ...]:
    """The routing maths, in one place: ``(probs [T, E] float32, weights [T, k] float32, expert_ids [T, k])``.

    Softmax over all E logits in float32, then top-k, then (optionally) renormalisation of the k weights.
    The router, the load-balancing loss and the router analysis all route through this function.
    """
    # Softmax over all E logits, then top-k: the softmax over only the k largest logits is equal in value,
    # but with it inductor (torch 2.13) computed wrong gradients for a tower that also takes the
    # load-balancing loss (tests/moe/test_moe_compile.py::test_inductor_training_gradients_match_eager).
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, expert_ids = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return probs, weights, expert_ids


class RouterDecision(NamedTuple):
    """What the router decided for ``T`` tokens.

    Attributes:
        logits: ``[T, E]`` raw gate logits (the input's dtype), kept for the load-balancing loss.
        weights: ``[T, k]`` combination weights of the selected experts (the input's dtype).
        expert_ids: ``[T, k]`` indices of the selected experts.
    """

    logits: torch.Tensor
    weights: torch.Tensor
    expert_ids: torch.Tensor


class TopKRouter(nn.Module):
    """Routes each token to ``top_k`` of ``num_experts`` experts (Mixtral style).

    The parameter is ``weight [num_experts, hidden_size]``, so checkpoints hold ``...mlp.router.weight``.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_topk_prob: bool = True):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.normal_(self.weight, std=hidden_size**-0.5)

    def forward(self, hidden_states: torch.Tensor) -> RouterDecision:
        """Route ``hidden_states [T, D]``."""
        logits = nn.functional.linear(hidden_states, self.weight)
        _, weights, expert_ids = route(logits, self.top_k, self.norm_topk_prob)
        return RouterDecision(logits, weights.to(hidden_states.dtype), expert_ids)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, norm_topk_prob={self.norm_topk_prob}"
