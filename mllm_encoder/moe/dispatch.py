"""Token dispatch: group the (token, slot) pairs by expert, and combine the expert outputs back.

One stable sort of the flattened expert ids gives contiguous per-expert slices; the combine step
gathers the outputs back by the inverse permutation and sums the k weighted slots of each token, which
is deterministic (no atomic ``index_add_``). Nothing here synchronises the device with the host.
"""

from typing import NamedTuple

import torch


class DispatchPlan(NamedTuple):
    """Where every (token, slot) pair goes.

    Attributes:
        token_index: ``[T*k]`` source token of each sorted slot.
        expert_ids: ``[T*k]`` expert of each sorted slot, ascending.
        inverse: ``[T*k]`` sorted position of each (token, slot) pair in row-major ``[T, k]`` order.
        group_ends: ``[E]`` exclusive end offset of each expert's slice (the grouped-GEMM ``offs``).
        counts: ``[E]`` slots routed to each expert.
    """

    token_index: torch.Tensor
    expert_ids: torch.Tensor
    inverse: torch.Tensor
    group_ends: torch.Tensor
    counts: torch.Tensor


def plan_dispatch(expert_ids: torch.Tensor, num_experts: int) -> DispatchPlan:
    """Plan the dispatch of ``expert_ids [T, k]`` to ``num_experts`` experts."""
    top_k = expert_ids.shape[-1]
    flat = expert_ids.reshape(-1)
    sorted_ids, order = torch.sort(flat, stable=True)
    positions = torch.arange(order.numel(), device=order.device)
    inverse = torch.empty_like(order).scatter_(0, order, positions)
    experts = torch.arange(num_experts, device=flat.device, dtype=sorted_ids.dtype)
    group_ends = torch.searchsorted(sorted_ids, experts, right=True)
    counts = torch.diff(group_ends, prepend=group_ends.new_zeros(1))
    return DispatchPlan(order // top_k, sorted_ids, inverse, group_ends, counts)


def gather_tokens(hidden_states: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """``hidden_states [T, D]`` -> ``[T*k, D]`` in expert order."""
    return hidden_states.index_select(0, plan.token_index)


def combine_outputs(expert_outputs: torch.Tensor, plan: DispatchPlan, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum over the k slots: ``expert_outputs [T*k, D]`` (expert order) -> ``[T, D]``."""
    num_tokens, top_k = weights.shape
    per_slot = expert_outputs.index_select(0, plan.inverse).view(num_tokens, top_k, -1)
    return (per_slot * weights.unsqueeze(-1)).sum(dim=1)
