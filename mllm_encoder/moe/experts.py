"""Experts stored as stacked 3-D parameters, with grouped matrix multiplication over expert slices.

Stacking (rather than a ModuleList of Linears) means every rank touches the same parameters whatever the
routing, so DeepSpeed ZeRO-3 never waits on an expert that one rank did not use, and it allows grouped
GEMMs. Parameter names follow the checkpoint format: ``fc1.weight [E, I, D]``, ``fc1.bias [E, I]``,
``fc2.weight [E, D, I]``, ``fc2.bias [E, D]``.

Backends (``StackedExperts.backend``):

* ``"grouped"``: one ``torch._grouped_mm`` per projection over all expert slices: no host synchronisation
  and shapes fixed by the number of tokens, so it traces with ``torch.compile(fullgraph=True)`` and is
  captured by CUDA graphs (on CUDA with bf16 on sm90/sm100, where torch has a fused grouped kernel). The
  expert biases are added by :class:`_ExpertBias`: no ``[N, out]`` gathered bias eager, a fused indexed
  load compiled, and a GEMM (not an atomic scatter) for the bias gradient.
* ``"loop"``: one ``.tolist()`` of the slice ends, then fc1 -> activation -> fc2 per expert slice with
  ``addmm`` (bias in the GEMM epilogue). ``torch.compile`` traces the slice sizes as data-dependent sizes
  (one graph, but a host sync per layer: no CUDA graphs).
* ``"auto"``: the table in :func:`resolve_backend`.

QuickGELU ``x * sigmoid(1.702 x)`` is evaluated as ``silu(1.702 x) / 1.702`` with both factors folded into
the GEMMs' ``alpha`` / ``beta``: one element-wise kernel over the ``[N, I]`` intermediate instead of three.
"""

import functools
import math
from typing import List, Optional, Union

import torch
from torch import nn
from transformers.activations import ACT2FN

from mllm_encoder.moe.dispatch import DispatchPlan

MATMUL_BACKENDS = ("auto", "grouped", "loop")
QUICK_GELU_SCALE = 1.702


def grouped_mm_available() -> bool:
    """Whether the installed torch has a grouped GEMM (``torch._grouped_mm``, torch >= 2.8)."""
    return hasattr(torch, "_grouped_mm")


@functools.cache
def _cuda_has_grouped_kernel(device_index: int) -> bool:
    """torch's fused grouped GEMM (CUTLASS, bf16) exists on sm90 (Hopper) and sm100 (Blackwell) only.

    Cached per device index: the capability is fixed for the process, and the backend is chosen in every layer.
    """
    return torch.cuda.get_device_capability(device_index)[0] in (9, 10)


def compute_dtype(hidden_states: torch.Tensor) -> torch.dtype:
    """The dtype the expert GEMMs run in: autocast's when it is on for the device, else the input's."""
    device_type = hidden_states.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden_states.dtype


def resolve_backend(backend: str, hidden_states: torch.Tensor, *dims: int, dtype: Optional[torch.dtype] = None) -> str:
    """The matmul strategy for ``hidden_states`` (``dims``: the expert widths, for alignment; ``dtype``: its
    :func:`compute_dtype` when the caller has it already).

    ``"auto"`` resolves by this table, on :func:`compute_dtype` (measurements in docs/benchmarks.md):

    =======  ==========================================================  =======
    device   condition                                                   backend
    =======  ==========================================================  =======
    any      not bf16: torch's grouped GEMM is a bf16 kernel (its        loop
             fallback copies the offsets to the host and loops over
             the groups, and ``torch.compile`` traces it in bf16 only)
    CUDA     bf16, widths % 8 == 0, sm90/sm100 or under torch.compile    grouped
    CUDA     other bf16 cases (no fused grouped kernel)                  loop
    CPU      bf16                                                        grouped
    =======  ==========================================================  =======
    """
    if backend not in MATMUL_BACKENDS:
        raise ValueError(f"dispatch backend must be one of {MATMUL_BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    dtype = dtype if dtype is not None else compute_dtype(hidden_states)
    if dtype != torch.bfloat16 or not grouped_mm_available():
        return "loop"
    if hidden_states.is_cuda:
        aligned = all(d % 8 == 0 for d in dims)
        fast = torch.compiler.is_compiling() or _cuda_has_grouped_kernel(hidden_states.device.index)
        return "grouped" if aligned and fast else "loop"
    return "grouped"


class _ExpertBias(torch.autograd.Function):
    """``scale * out + bias_scale * bias[expert_ids]``; the bias gradient is ``one_hot^T @ grad``, a GEMM.

    Eager, one ``addmm`` of the ``[N, E]`` one-hot matrix with the ``[E, out]`` bias (no ``[N, out]`` gathered
    bias). Under ``torch.compile``, an indexed load that inductor fuses with the following activation. Either
    way the backward accumulates nothing with atomics (deterministic).
    """

    @staticmethod
    def forward(ctx, out, bias, one_hot, expert_ids, scale: float, bias_scale: float):
        ctx.save_for_backward(one_hot)
        ctx.scale, ctx.bias_scale = scale, bias_scale
        if torch.compiler.is_compiling():
            return scale * out + bias_scale * bias[expert_ids]
        return torch.addmm(out, one_hot, bias, beta=scale, alpha=bias_scale)

    @staticmethod
    def backward(ctx, grad):
        (one_hot,) = ctx.saved_tensors
        grad_out = grad if ctx.scale == 1 else grad * ctx.scale
        grad_bias = torch.mm(one_hot.t(), grad)
        return grad_out, grad_bias if ctx.bias_scale == 1 else grad_bias * ctx.bias_scale, None, None, None, None


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

    def forward(
        self,
        rows: Union[torch.Tensor, List[torch.Tensor]],
        plan: DispatchPlan,
        scale: float = 1.0,
        bias_scale: float = 1.0,
        one_hot: Optional[torch.Tensor] = None,
    ):
        """``scale * rows @ W_e^T + bias_scale * b_e`` for the expert e of each row.

        ``rows``: expert-sorted ``[N, in]`` (one grouped GEMM), or a list of per-expert slices (slice e for
        expert e, possibly empty) mapped to the list of their outputs. Called once per layer either way, so
        DeepSpeed ZeRO-3's hooks gather the stacked weight once. ``one_hot``: the grouped GEMM's
        ``plan.one_hot(dtype)``, whose dtype is the one the GEMM runs in (default: built here in
        :func:`compute_dtype`; :class:`StackedExperts` builds it once for both projections).
        """
        if isinstance(rows, list):
            return [
                torch.addmm(self.bias[e], piece, self.weight[e].t(), beta=bias_scale, alpha=scale)
                for e, piece in enumerate(rows)
            ]
        if one_hot is None:
            one_hot = plan.one_hot(compute_dtype(rows))  # autocast does not cover the grouped GEMM
        dtype = one_hot.dtype
        out = torch._grouped_mm(rows.to(dtype), self.weight.to(dtype).transpose(-2, -1), offs=plan.offsets)
        return _ExpertBias.apply(out, self.bias.to(dtype), one_hot, plan.expert_ids, scale, bias_scale)

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
        # QuickGELU(x) = silu(s x) / s: s goes into fc1's alpha and beta, 1 / s into fc2's alpha.
        self._act_scale = QUICK_GELU_SCALE if hidden_act == "quick_gelu" else 1.0
        self._act = nn.functional.silu if hidden_act == "quick_gelu" else self.activation_fn
        self.backend = "auto"

    def forward(self, rows: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Apply expert ``plan.expert_ids[n]`` to row n of ``rows [N, D]``."""
        dtype = compute_dtype(rows)
        backend = resolve_backend(self.backend, rows, self.fc1.out_features, self.fc1.in_features, dtype=dtype)
        s = self._act_scale
        if backend == "grouped":
            one_hot = plan.one_hot(dtype)
            hidden = self._act(self.fc1(rows, plan, s, s, one_hot))
            return self.fc2(hidden, plan, 1 / s, one_hot=one_hot)
        # One slice per expert: fc1 -> activation -> fc2 stay per slice, only the outputs are concatenated.
        pieces = list(rows.split(plan.counts.tolist()))
        hidden = [self._act(piece) for piece in self.fc1(pieces, plan, s, s)]
        return torch.cat(self.fc2(hidden, plan, 1 / s))
