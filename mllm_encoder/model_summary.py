"""Parameter counts and MoE layout of a CLIP-MoE model, for ``clip-moe inspect``."""

from dataclasses import asdict, dataclass, field
from typing import Dict, List

from torch import nn

from mllm_encoder.moe import SparseMoE
from mllm_encoder.towers import TOWERS


@dataclass
class TowerSummary:
    """One tower: shape, MoE layout and parameter counts (active = used by one token)."""

    layers: int
    hidden_size: int
    num_experts: int
    top_k: int
    moe_layers: List[int]
    experts_per_layer: List[int]
    parameters: int
    active_parameters: int


@dataclass
class ModelSummary:
    """The whole model: its towers and totals."""

    model_class: str
    towers: Dict[str, TowerSummary] = field(default_factory=dict)
    parameters: int = 0
    active_parameters: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _inactive_expert_parameters(layer_ffn: nn.Module) -> int:
    if not isinstance(layer_ffn, SparseMoE):
        return 0
    per_expert = _count(layer_ffn.experts) // layer_ffn.num_experts
    return (layer_ffn.num_experts - layer_ffn.top_k) * per_expert


def summarize_tower(tower: nn.Module, config) -> TowerSummary:
    """Summarise one ``VisionTransformer``/``TextTransformer`` with its config."""
    ffns = [layer.mlp for layer in tower.encoder.layers]
    total = _count(tower)
    return TowerSummary(
        layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_experts=config.num_experts,
        top_k=config.top_k,
        moe_layers=config.moe_layer_indices,
        experts_per_layer=[ffn.num_experts if isinstance(ffn, SparseMoE) else 1 for ffn in ffns],
        parameters=total,
        active_parameters=total - sum(_inactive_expert_parameters(ffn) for ffn in ffns),
    )


def summarize_model(model: nn.Module) -> ModelSummary:
    """Summarise a ``CLIPMoEModel``, ``CLIPMoEVisionModel`` or ``CLIPMoETextModel``."""
    summary = ModelSummary(model_class=type(model).__name__)
    for tower_names in TOWERS:
        tower = getattr(model, tower_names.module, None)
        if tower is not None:
            summary.towers[tower_names.name] = summarize_tower(tower, tower.config)
    summary.parameters = _count(model)
    inactive = sum(t.parameters - t.active_parameters for t in summary.towers.values())
    summary.active_parameters = summary.parameters - inactive
    return summary
