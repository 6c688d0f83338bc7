"""Make a CLIP-MoE (or SigLIP-MoE) from dense CLIPs (or SigLIPs).

* :func:`assemble_experts` (DMU's initialisation): N dense models that share every parameter except their
  FFNs become one MoE whose expert i in each layer is model i's FFN.
* :func:`sparse_upcycle` (the baseline): one dense FFN copied into every expert.

Routers start random (seed torch's RNG for reproducible routers); everything else is copied.
"""

import logging
import re
from typing import Dict, List, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from mllm_encoder.layers import is_encoder_ffn_parameter
from mllm_encoder.loading import ModelSource, load_clip_moe
from mllm_encoder.modeling_clip_moe import CLIPMoEPreTrainedModel
from mllm_encoder.towers import TOWER_NAMES, TOWERS

logger = logging.getLogger(__name__)

MoELayers = Union[None, Sequence[int], Dict[str, Optional[Sequence[int]]]]
EXPERT_PARAM = re.compile(r"^(?P<layer>.*\.layers\.\d+\.mlp)\.experts\.(?P<param>fc[12]\.(weight|bias))$")


def _tower_configs(config) -> Dict[str, object]:
    """``{"vision": ..., "text": ...}`` for a two-tower config, or the single tower's config."""
    if all(hasattr(config, tower.config_key) for tower in TOWERS):
        return {tower.name: getattr(config, tower.config_key) for tower in TOWERS}
    return {tower.name: config for tower in TOWERS if tower.config_key == config.tower_key}


def _layers_for(moe_layers: MoELayers, tower: str) -> Optional[List[int]]:
    if isinstance(moe_layers, dict):
        unknown = set(moe_layers) - set(TOWER_NAMES)
        if unknown:
            raise ValueError(f"moe_layers: unknown tower(s) {sorted(unknown)}; use 'vision' and/or 'text'")
        return moe_layers.get(tower)
    return None if moe_layers is None else list(moe_layers)


def moe_config(dense_config, num_experts: int, top_k: int, moe_layers: MoELayers = None):
    """A copy of ``dense_config`` whose towers have ``num_experts`` experts, ``top_k``, ``moe_layers``.

    ``moe_layers``: ``None`` (every layer of every tower), one list of layer indices for every tower, or a
    dict ``{"vision": [...], "text": [...]}`` (a missing tower: every layer; ``[]``: dense).
    """
    config_dict = dense_config.to_dict()
    present = _tower_configs(dense_config)
    for tower in TOWERS:
        if tower.name in present:
            target = config_dict.get(tower.config_key, config_dict)  # a tower config is its own target
            target.update(num_experts=num_experts, top_k=top_k, moe_layers=_layers_for(moe_layers, tower.name))
    return type(dense_config).from_dict(config_dict)


def _check_dense(model: CLIPMoEPreTrainedModel, index: int) -> None:
    for tower, config in _tower_configs(model.config).items():
        if config.moe_layer_indices:
            raise ValueError(
                f"model {index}: the {tower} tower is already MoE (layers {config.moe_layer_indices}); "
                "assemble_experts and sparse_upcycle take dense models"
            )


def check_shared_parameters(models: Sequence[CLIPMoEPreTrainedModel], atol: float = 0.0) -> None:
    """Raise ``ValueError`` naming the first non-FFN tensor on which a model differs from model 0."""
    reference = models[0].state_dict()
    for index, model in enumerate(models[1:], start=1):
        if type(model) is not type(models[0]):
            raise ValueError(f"model {index} is a {type(model).__name__}, model 0 a {type(models[0]).__name__}")
        state = model.state_dict()
        if set(state) != set(reference):
            missing = sorted(set(reference) ^ set(state))[:3]
            raise ValueError(f"model {index} has different parameters from model 0 (e.g. {missing})")
        for name, tensor in reference.items():
            if is_encoder_ffn_parameter(name):
                continue
            other = state[name]
            if other.shape != tensor.shape:
                raise ValueError(f"model {index}: {name} has shape {tuple(other.shape)}, model 0 {tuple(tensor.shape)}")
            difference = (other.float() - tensor.float()).abs().max().item() if tensor.numel() else 0.0
            if difference > atol:
                raise ValueError(
                    f"model {index} differs from model 0 at {name} (max abs diff {difference:.3g}); "
                    "the models to assemble must share every parameter except their FFNs"
                )


def _assembled_state(target_state, sources: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    state = {}
    for name, initial in target_state.items():
        match = EXPERT_PARAM.match(name)
        if match:
            dense_name = f"{match['layer']}.{match['param']}"
            state[name] = torch.stack([source[dense_name] for source in sources])
        elif name.endswith(".mlp.router.weight"):
            state[name] = initial
        else:
            state[name] = sources[0][name]
    return state


def assemble_experts(
    models: Sequence[ModelSource], top_k: int, moe_layers: MoELayers = None, atol: float = 0.0
) -> CLIPMoEPreTrainedModel:
    """Build an MoE whose expert i (in each MoE layer) is the FFN of ``models[i]``.

    Args:
        models: N >= 1 dense models (directories of HF CLIP / SigLIP or CLIP-MoE / SigLIP-MoE checkpoints, or
            in-memory models) that agree on every non-FFN parameter (to ``atol``).
        top_k: experts per token.
        moe_layers: which layers become MoE (see :func:`moe_config`).
    """
    if not models:
        raise ValueError("assemble_experts needs at least one model")
    from_disk = sum(not isinstance(m, torch.nn.Module) for m in models)
    loaded = [load_clip_moe(m) for m in tqdm(models, desc="loading models", disable=from_disk < 2)]
    for index, model in enumerate(loaded):
        _check_dense(model, index)
    check_shared_parameters(loaded, atol)
    reference = loaded[0]
    config = moe_config(reference.config, len(loaded), top_k, moe_layers)
    target = type(reference)(config)
    sources = [model.state_dict() for model in loaded]
    target.load_state_dict(_assembled_state(target.state_dict(), sources))
    logger.info("assembled %d models into %s experts, top-%d", len(loaded), len(loaded), top_k)
    return target.to(next(reference.parameters()).dtype)


def sparse_upcycle(
    dense: ModelSource, num_experts: int, top_k: int, moe_layers: MoELayers = None
) -> CLIPMoEPreTrainedModel:
    """Copy the FFN of ``dense`` into ``num_experts`` experts of each MoE layer (sparse upcycling)."""
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    model = load_clip_moe(dense)
    return assemble_experts([model] * num_experts, top_k, moe_layers)
