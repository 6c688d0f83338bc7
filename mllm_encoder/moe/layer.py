"""The sparse Mixture-of-Experts FFN: router -> dispatch -> stacked experts -> combine."""

from typing import Tuple

import torch
from torch import nn

from mllm_encoder.moe.dispatch import combine_outputs, gather_tokens, plan_dispatch
from mllm_encoder.moe.experts import StackedExperts
from mllm_encoder.moe.router import TopKRouter


class SparseMoE(nn.Module):
    """A drop-in replacement of a CLIP MLP by ``num_experts`` MLPs of which each token uses ``top_k``.

    Args:
        hidden_size: token width D.
        intermediate_size: each expert's hidden width I.
        num_experts: E.
        top_k: experts per token.
        hidden_act: the experts' activation (``"quick_gelu"`` for OpenAI CLIP).
        norm_topk_prob: renormalise the selected router probabilities to sum to 1.

    ``forward(hidden_states[..., D]) -> (output[..., D], router_logits[num_tokens, E])``. Set
    ``layer.experts.backend`` to ``"grouped"`` or ``"loop"`` to force a matmul strategy.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        hidden_act: str = "quick_gelu",
        norm_topk_prob: bool = True,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.router = TopKRouter(hidden_size, num_experts, top_k, norm_topk_prob)
        self.experts = StackedExperts(num_experts, hidden_size, intermediate_size, hidden_act)

    def forward(self, hidden_states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        shape = hidden_states.shape
        tokens = hidden_states.reshape(-1, shape[-1])
        decision = self.router(tokens)
        plan = plan_dispatch(decision.expert_ids, self.num_experts)
        expert_outputs = self.experts(gather_tokens(tokens, plan), plan)
        output = combine_outputs(expert_outputs, plan, decision.weights)
        return output.view(shape), decision.logits
