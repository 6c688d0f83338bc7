"""What every family's configs share: the field checks, the tower fields (transformer shape and MoE settings)
and the two-tower config. A family's configuration file states only what differs (its ``model_type``s, defaults
and extra fields), as transformers' ``modular_*`` files do.

Every field is type- and range-checked when a config is built (from keyword arguments, a dict or a
``config.json``); a bad value raises ``ValueError`` naming the field.
"""

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from transformers import PretrainedConfig
from transformers.activations import ACT2FN


def check_int(field: str, value: Any, minimum: int, maximum: Optional[int] = None) -> int:
    """``value`` as an ``int`` in ``[minimum, maximum]``; ``ValueError`` naming ``field`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{field} must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{field} must be {bound}, got {value}")
    return value


def check_number(field: str, value: Any, minimum: float, maximum: float = math.inf, open_minimum=False) -> float:
    """``value`` as a finite number in ``[minimum, maximum]`` (``(minimum, ...`` with ``open_minimum``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{field} must be a finite number, got {value!r} ({type(value).__name__})")
    if value < minimum or (open_minimum and value == minimum) or value > maximum:
        low = "(" if open_minimum else "["
        raise ValueError(f"{field} must be in {low}{minimum}, {maximum}], got {value}")
    return value


def check_bool(field: str, value: Any) -> bool:
    """``value`` when it is a ``bool``; ``ValueError`` naming ``field`` otherwise."""
    if not isinstance(value, bool):
        raise ValueError(f"{field} must be true or false, got {value!r}")
    return value


def check_patch_grid(image_size: Any, patch_size: Any) -> Tuple[int, int]:
    """``(image_size, patch_size)``, positive integers with ``image_size`` a multiple of ``patch_size``."""
    check_int("image_size", image_size, 1)
    check_int("patch_size", patch_size, 1)
    if image_size % patch_size:
        raise ValueError(f"image_size ({image_size}) must be divisible by patch_size ({patch_size})")
    return image_size, patch_size


def _validated_moe_layers(moe_layers: Optional[Sequence[int]], num_hidden_layers: int) -> Optional[List[int]]:
    if moe_layers is None:
        return None
    if isinstance(moe_layers, (str, bytes)) or not isinstance(moe_layers, Sequence):
        raise ValueError(f"moe_layers must be a list of layer indices or null, got {moe_layers!r}")
    layers = [check_int("moe_layers", index, 0) for index in moe_layers]
    for index in layers:
        if index >= num_hidden_layers:
            raise ValueError(
                f"moe_layers: layer index {index} is out of range for num_hidden_layers={num_hidden_layers}"
            )
    if len(set(layers)) != len(layers):
        raise ValueError(f"moe_layers: duplicate layer indices in {layers}")
    return sorted(layers)


class MoETowerConfig(PretrainedConfig):
    """Fields shared by both towers: the transformer shape and the MoE settings.

    Args:
        hidden_size: width of the residual stream.
        intermediate_size: hidden width of each FFN (of each expert in an MoE layer).
        projection_dim: width of the joint embedding space (used by ``CLIPMoEModel``).
        num_hidden_layers: number of transformer layers.
        num_attention_heads: attention heads per layer.
        hidden_act: FFN activation; OpenAI CLIP uses ``"quick_gelu"``.
        layer_norm_eps: epsilon of every LayerNorm.
        attention_dropout: dropout on attention probabilities (training only).
        initializer_range, initializer_factor: weight initialisation scales (as in HF CLIP).
        num_experts: experts per MoE layer; 1 makes the tower dense.
        top_k: experts each token is routed to.
        moe_layers: indices of the layers that are MoE; ``None`` means every layer.
        router_aux_loss_coef: weight of the load-balancing loss when it is added to a training loss.
        norm_topk_prob: renormalise the top-k router probabilities to sum to 1 (Mixtral style).
    """

    # Each family's tower config states its own ``model_type``, HF's dense ``hf_model_type`` it also reads and
    # ``tower_key`` (its key in a two-tower config); ``two_tower_model_types`` (the two-tower ``model_type``s
    # holding it) is set by its two-tower config (:meth:`TwoTowerConfig.__init_subclass__`). Class attributes
    # without annotations: transformers 5.x turns annotated ones into dataclass fields.
    two_tower_model_types = ()

    def __init__(
        self,
        hidden_size: int = 512,
        intermediate_size: int = 2048,
        projection_dim: int = 512,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 8,
        hidden_act: str = "quick_gelu",
        layer_norm_eps: float = 1e-5,
        attention_dropout: float = 0.0,
        initializer_range: float = 0.02,
        initializer_factor: float = 1.0,
        num_experts: int = 1,
        top_k: int = 1,
        moe_layers: Optional[Sequence[int]] = None,
        router_aux_loss_coef: float = 0.01,
        norm_topk_prob: bool = True,
        **kwargs: Any,
    ):
        kwargs.pop("model_type", None)
        super().__init__(**kwargs)
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.projection_dim = projection_dim
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.initializer_factor = initializer_factor
        self.num_experts = num_experts
        self.top_k = top_k
        self.moe_layers = moe_layers
        self.router_aux_loss_coef = router_aux_loss_coef
        self.norm_topk_prob = norm_topk_prob
        self.validate_moe()

    def validate_moe(self) -> None:
        """Raise ``ValueError`` naming the field when a field has the wrong type or range, or fields disagree."""
        for field in ("hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers", "num_attention_heads"):
            check_int(field, getattr(self, field), 1)
        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACT2FN:
            raise ValueError(f"hidden_act must be one of transformers' activations, got {self.hidden_act!r}")
        check_number("layer_norm_eps", self.layer_norm_eps, 0.0, open_minimum=True)
        check_number("attention_dropout", self.attention_dropout, 0.0, 1.0)
        check_number("initializer_range", self.initializer_range, 0.0)
        check_number("initializer_factor", self.initializer_factor, 0.0)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        check_int("num_experts", self.num_experts, 1)
        check_int(f"top_k (num_experts={self.num_experts})", self.top_k, 1, self.num_experts)
        check_number("router_aux_loss_coef", self.router_aux_loss_coef, 0.0)
        check_bool("norm_topk_prob", self.norm_topk_prob)
        self.moe_layers = _validated_moe_layers(self.moe_layers, self.num_hidden_layers)

    def _get_generation_parameters(self) -> Dict[str, Any]:
        """transformers 5.x refuses to save generation parameters; here ``top_k`` is the MoE routing."""
        parameters = (
            dict(super()._get_generation_parameters()) if hasattr(super(), "_get_generation_parameters") else {}
        )
        parameters.pop("top_k", None)
        return parameters

    def is_moe_layer(self, index: int) -> bool:
        """Whether layer ``index`` holds a sparse MoE FFN."""
        if self.num_experts == 1:
            return False
        return self.moe_layers is None or index in self.moe_layers

    @property
    def moe_layer_indices(self) -> List[int]:
        """Indices of the MoE layers (empty for a dense tower)."""
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @classmethod
    def from_dict(cls, config_dict: Dict[str, Any], **kwargs: Any) -> "PretrainedConfig":
        config_dict = dict(config_dict)
        if "num_experts" not in config_dict:
            # A dense HF config: transformers 4.x stores generation defaults, top_k=50 among them.
            config_dict.pop("top_k", None)
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs: Any) -> "PretrainedConfig":
        """Load this tower's config from a tower directory or from a two-tower directory of its family."""
        config_dict, kwargs = cls.get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") in cls.two_tower_model_types:
            config_dict = config_dict[cls.tower_key]
        return cls.from_dict(config_dict, **kwargs)


class TextTowerFields:
    """Mixin of the text-tower configs: ``vocab_size``, ``max_position_embeddings`` and the special token ids
    (``None`` or >= 0), checked before the shared tower fields."""

    def __init__(
        self,
        vocab_size: int,
        max_position_embeddings: int,
        pad_token_id: Optional[int],
        bos_token_id: Optional[int],
        eos_token_id: Optional[int],
        **kwargs: Any,
    ):
        self.vocab_size = check_int("vocab_size", vocab_size, 1)
        self.max_position_embeddings = check_int("max_position_embeddings", max_position_embeddings, 1)
        for field, value in (
            ("pad_token_id", pad_token_id),
            ("bos_token_id", bos_token_id),
            ("eos_token_id", eos_token_id),
        ):
            if value is not None:
                check_int(field, value, 0)
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)


TowerConfig = Union[PretrainedConfig, Dict[str, Any], None]


class TwoTowerConfig(PretrainedConfig):
    """Base of the two-tower configs: ``text_config`` and ``vision_config`` (of the classes in ``sub_configs``,
    built from a config or a dict; a bad field is reported as ``text_config.<field>``), and ``from_pretrained``
    reading only directories of the family: ``model_type`` or HF's dense ``hf_model_type``.

    ``initializer_factor`` is 1.0 whatever the input, as in HF ``CLIPConfig`` and ``SiglipConfig``: each tower
    config carries its own (used by the tower-alone models); SigLIP's initialisation uses none.
    """

    # A family's two-tower config states ``model_type``, ``hf_model_type`` and ``sub_configs`` (tower configs).

    def __init_subclass__(cls, **kwargs: Any):
        """Tell each tower config of ``sub_configs`` which two-tower ``model_type``s hold it."""
        super().__init_subclass__(**kwargs)
        for tower_config in cls.__dict__.get("sub_configs", {}).values():
            tower_config.two_tower_model_types = cls.read_model_types()

    @classmethod
    def read_model_types(cls) -> Tuple[str, ...]:
        """The ``model_type``s this config reads: HF's dense one and ours."""
        return (cls.hf_model_type, cls.model_type)

    def __init__(self, text_config: TowerConfig = None, vision_config: TowerConfig = None, **kwargs: Any):
        kwargs.pop("model_type", None)
        kwargs.pop("initializer_factor", None)
        super().__init__(**kwargs)
        self.initializer_factor = 1.0
        self.text_config = self._tower(self.sub_configs["text_config"], text_config, "text_config")
        self.vision_config = self._tower(self.sub_configs["vision_config"], vision_config, "vision_config")

    @staticmethod
    def _tower(config_class, value: TowerConfig, field: str):
        """A tower config from ``value``; a bad field is reported as ``field.name``."""
        if value is None:
            return config_class()
        if isinstance(value, PretrainedConfig):
            value = value.to_dict()
        if not isinstance(value, dict):
            raise ValueError(f"{field} must be a mapping of tower settings, got {type(value).__name__}")
        try:
            return config_class.from_dict(dict(value))
        except ValueError as error:
            raise ValueError(f"{field}.{error}") from error

    @classmethod
    def from_text_vision_configs(
        cls, text_config: PretrainedConfig, vision_config: PretrainedConfig, **kwargs: Any
    ) -> "TwoTowerConfig":
        """Build a two-tower config from the tower configs (HF CLIP's and SigLIP's constructor of the same name)."""
        return cls(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(), **kwargs)

    def to_dict(self) -> Dict[str, Any]:
        output = super().to_dict()
        output["text_config"] = self.text_config.to_dict()
        output["vision_config"] = self.vision_config.to_dict()
        return output

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs: Any) -> "PretrainedConfig":
        """Load from a directory of this family, ours or HF's (an HF config is read as a dense MoE config)."""
        config_dict, kwargs = cls.get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") not in cls.read_model_types():
            raise ValueError(
                f"{pretrained_model_name_or_path}: config model_type is {config_dict.get('model_type')!r}, "
                f"expected one of {sorted(cls.read_model_types())}"
            )
        return cls.from_dict(config_dict, **kwargs)
