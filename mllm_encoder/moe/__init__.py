"""The Mixture-of-Experts layer, split along its seams: router, dispatch, experts, losses."""

from mllm_encoder.moe.dispatch import DispatchPlan, combine_outputs, gather_tokens, plan_dispatch
from mllm_encoder.moe.experts import GroupedLinear, StackedExperts, grouped_mm_available
from mllm_encoder.moe.layer import SparseMoE
from mllm_encoder.moe.losses import load_balancing_loss, mean_load_balancing_loss, two_tower_aux_losses
from mllm_encoder.moe.router import RouterDecision, TopKRouter, route

__all__ = [
    "DispatchPlan",
    "GroupedLinear",
    "RouterDecision",
    "SparseMoE",
    "StackedExperts",
    "TopKRouter",
    "combine_outputs",
    "gather_tokens",
    "grouped_mm_available",
    "load_balancing_loss",
    "mean_load_balancing_loss",
    "plan_dispatch",
    "route",
    "two_tower_aux_losses",
]
