"""Experts stored as stacked 3-D parameters, with grouped matrix multiplication over expert slices.

Stacking (rather than a ModuleList of Linears) means every rank touches the same parameters whatever the
routing, so DeepSpeed ZeRO-3 never waits on an expert that one rank did not use, and it allows grouped
GEMMs. Parameter names follow the checkpoint format: ``fc1.weight [E, I, D]``, ``fc1.bias [E, I]``,
``fc2.weight [E, D, I]``, ``fc2.bias [E, D]``.
"""

import math
from typing import List, Union

import torch
from torch import nn
from transformers.activations import ACT2FN

from mllm_encoder.moe.dispatch import DispatchPlan

BACKENDS = ("auto", "grouped", "loop")


def grouped_mm_available() -> bool:
    """Whether the installed torch has a grouped GEMM (``torch._grouped_mm``, torch >= 2.8)."""
    return hasattr(torch, "_grouped_mm")


def resolve_backend(backend: str, hidden_states: torch.Tensor, *dims: int) -> str:
    """Pick the matmul strategy: grouped GEMM on CUDA in bf16 when available, else a loop over slices."""
    if backend not in BACKENDS:
        raise ValueError(f"dispatch backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    aligned = all(d % 8 == 0 for d in dims)
    use_grouped = hidden_states.is_cuda and hidden_states.dtype == torch.bfloat16 and aligned and grouped_mm_available()
    return "grouped" if use_grouped else "loop"


class GroupedLinear(nn.Module):
    """``E`` linear maps ``in_features -> out_features`` applied to expert-sorted rows."""

    def __init__(self, num_experts: int, in_features: int, out_features: int):
        super().__init__()
        self.num_experts = num_experts
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(num_experts, out_features))
        bound = 1 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, rows: Union[torch.Tensor, List[torch.Tensor]], plan: DispatchPlan):
        """Map expert-sorted rows ``[N, in]`` to ``[N, out]`` with one grouped GEMM, or a list of per-expert
        slices (slice e for expert e, possibly empty) to the list of their outputs.

        Called once per layer either way, so DeepSpeed ZeRO-3's hooks gather the stacked weight once.
        """
        if isinstance(rows, list):
            return [torch.addmm(self.bias[e], piece, self.weight[e].transpose(0, 1)) for e, piece in enumerate(rows)]
        out = torch._grouped_mm(rows, self.weight.transpose(-2, -1), offs=plan.group_ends.to(torch.int32))
        return out + self.bias.index_select(0, plan.expert_ids)

    def extra_repr(self) -> str:
        # From attributes: under DeepSpeed ZeRO-3 the weight is a partitioned placeholder.
        return f"num_experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features}"


class StackedExperts(nn.Module):
    """``E`` CLIP MLPs (fc1 -> activation -> fc2) evaluated on expert-sorted rows."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.num_experts = num_experts
        self.fc1 = GroupedLinear(num_experts, hidden_size, intermediate_size)
        self.fc2 = GroupedLinear(num_experts, intermediate_size, hidden_size)
        self.activation_fn = ACT2FN[hidden_act]
        self.backend = "auto"

    def forward(self, rows: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Apply expert ``plan.expert_ids[n]`` to row n of ``rows [N, D]``."""
        backend = resolve_backend(self.backend, rows, self.fc1.out_features, self.fc1.in_features)
        if backend == "grouped":
            return self.fc2(self.activation_fn(self.fc1(rows, plan)), plan)
        # One slice per expert: fc1 -> activation -> fc2 stay per slice, only the outputs are concatenated.
        pieces = list(rows.split(plan.counts.tolist()))
        hidden = [self.activation_fn(piece) for piece in self.fc1(pieces, plan)]
        return torch.cat(self.fc2(hidden, plan))
