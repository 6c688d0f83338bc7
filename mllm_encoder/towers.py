"""The two towers of a CLIP-MoE, named once: where each lives in a config, in a model and in a batch."""

from typing import NamedTuple


class Tower(NamedTuple):
    """One tower's names."""

    name: str  # in reports and in per-tower settings such as ``moe_layers={"vision": [...]}``
    config_key: str  # its sub-config in a two-tower config (``CLIPMoEConfig``)
    module: str  # its module attribute, and state-dict prefix, in every CLIP-MoE model class
    input_name: str  # the batch key it reads


VISION = Tower("vision", "vision_config", "vision_model", "pixel_values")
TEXT = Tower("text", "text_config", "text_model", "input_ids")
TOWERS = (VISION, TEXT)
TOWER_NAMES = tuple(tower.name for tower in TOWERS)
