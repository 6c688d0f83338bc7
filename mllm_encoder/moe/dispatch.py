"""Token dispatch: group the (token, slot) pairs by expert, and combine the expert outputs back.

One stable sort of the flattened expert ids gives contiguous per-expert slices. Gathering the tokens into
that order and combining the outputs back are adjoint permutations: both directions (forward and backward)
are gathers by ``token_index`` or ``inverse`` followed by a sum over the k slots of a token, so nothing is
accumulated with atomics and the results are deterministic. Nothing here synchronises the device with the
host, and every shape depends only on the number of tokens (CUDA-graph and ``torch.compile`` friendly).
"""

from typing import NamedTuple

import torch


class DispatchPlan(NamedTuple):
    """Where every (token, slot) pair goes; ``N = T*k`` slots in expert order.

    Attributes:
        token_index: ``[N]`` source token of each sorted slot.
        expert_ids: ``[N]`` expert of each sorted slot, ascending.
        inverse: ``[N]`` sorted position of each (token, slot) pair in row-major ``[T, k]`` order.
        offsets: ``[E]`` int32 exclusive end of each expert's slice (the grouped GEMM's ``offs``).
    """

    token_index: torch.Tensor
    expert_ids: torch.Tensor
    inverse: torch.Tensor
    offsets: torch.Tensor

    @property
    def counts(self) -> torch.Tensor:
        """``[E]`` slots routed to each expert."""
        return torch.diff(self.offsets, prepend=self.offsets.new_zeros(1))

    def one_hot(self, dtype: torch.dtype) -> torch.Tensor:
        """``[N, E]`` in ``dtype``: 1 where slot n goes to expert e, else 0.

        Only the grouped backend uses it (it adds the expert biases as a GEMM), so it is built on demand, once
        per layer, directly in the GEMMs' dtype.
        """
        experts = torch.arange(self.offsets.numel(), device=self.expert_ids.device, dtype=self.expert_ids.dtype)
        return (self.expert_ids.unsqueeze(1) == experts).to(dtype)


def plan_dispatch(expert_ids: torch.Tensor, num_experts: int) -> DispatchPlan:
    """Plan the dispatch of ``expert_ids [T, k]`` to ``num_experts`` experts."""
    top_k = expert_ids.shape[-1]
    sorted_ids, order = torch.sort(expert_ids.reshape(-1), stable=True)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    experts = torch.arange(num_experts, device=sorted_ids.device, dtype=sorted_ids.dtype)
    offsets = torch.searchsorted(sorted_ids, experts, right=True, out_int32=True)
    return DispatchPlan(order // top_k, sorted_ids, inverse, offsets)


class _GatherSlots(torch.autograd.Function):
    """``tokens[token_index]`` whose backward sums the k slots of each token through ``inverse`` (no atomics)."""

    @staticmethod
    def forward(ctx, tokens: torch.Tensor, token_index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.num_tokens = tokens.shape[0]
        return tokens.index_select(0, token_index)

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        per_slot = grad_rows.index_select(0, inverse).view(ctx.num_tokens, -1, grad_rows.shape[-1])
        return per_slot.sum(dim=1), None, None


def gather_tokens(hidden_states: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """``hidden_states [T, D]`` -> ``[T*k, D]`` in expert order."""
    return _GatherSlots.apply(hidden_states, plan.token_index, plan.inverse)


def combine_outputs(expert_outputs: torch.Tensor, plan: DispatchPlan, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum over the k slots: ``expert_outputs [T*k, D]`` (expert order) -> ``[T, D]``.

    The backward of the gather by the permutation ``inverse`` writes each row once (no collisions).
    """
    num_tokens, top_k = weights.shape
    per_slot = expert_outputs.index_select(0, plan.inverse).view(num_tokens, top_k, -1)
    return (per_slot * weights.unsqueeze(-1)).sum(dim=1)
