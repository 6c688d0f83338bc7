"""``load_pretrained_model`` that keeps trained CLIP-MoE tower weights and always returns the image processor.

The tower's parameters exist from construction, so ``from_pretrained`` restores the tower weights stored
in a LLaVA checkpoint. Checkpoints without them (a projector-only stage with ``model_base``, LoRA weights
on a base LLM without a trained tower) get the encoder weights from the CLIP-MoE checkpoint directory.
Stock LLaVA returns no image processor unless the model name contains ``llava``; this returns the tower's.
transformers 5 recreates loaded parameters with ``requires_grad=True``; ``from_pretrained`` of LLaVA models
freezes the CLIP-MoE tower again unless it was built with ``unfreeze_mm_vision_tower``.
"""

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable, Set

import torch

from mllm_encoder.vision_tower import CLIPMoEVisionTower

_TOWER_KEY = "vision_tower."


def _tensor_names(path: Path) -> Set[str]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return set(handle.keys())
    if path.name.endswith(".index.json"):
        return set(json.loads(path.read_text())["weight_map"])
    return set(torch.load(str(path), map_location="cpu", weights_only=True, mmap=True))


def checkpoint_has_tower_weights(model_path: str) -> bool:
    """Whether the weight files of a LLaVA checkpoint directory hold vision-tower tensors."""
    root = Path(model_path)
    patterns = ("*.safetensors", "*.index.json", "pytorch_model*.bin", "non_lora_trainables.bin")
    files = [path for pattern in patterns for path in root.glob(pattern)]
    return any(_TOWER_KEY in name for path in files for name in _tensor_names(path))


def _wrap(original: Callable) -> Callable:
    @functools.wraps(original)
    def load_pretrained_model(model_path: str, model_base: Any, model_name: str, *args: Any, **kwargs: Any):
        tokenizer, model, image_processor, context_len = original(model_path, model_base, model_name, *args, **kwargs)
        tower = model.get_vision_tower() if hasattr(model, "get_vision_tower") else None
        if isinstance(tower, CLIPMoEVisionTower):
            if not checkpoint_has_tower_weights(model_path):
                tower.load_source_weights()
            image_processor = tower.image_processor
        return tokenizer, model, image_processor, context_len

    load_pretrained_model._llava_patch = True
    return load_pretrained_model


def _wrap_from_pretrained(original: Any) -> Any:
    @functools.wraps(original)
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        model = original.__func__(cls, *args, **kwargs)
        tower = model.get_vision_tower()
        if isinstance(tower, CLIPMoEVisionTower):
            tower.reset_trainable()
        return model

    from_pretrained._llava_patch_freeze = True
    return classmethod(from_pretrained)


def apply() -> None:
    """Replace ``load_pretrained_model`` (in ``llava.model.builder`` and modules that imported it) and
    ``from_pretrained`` of LLaVA's Llama and Mistral models."""
    import llava.model.builder as builder
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM
    from llava.model.language_model.llava_mistral import LlavaMistralForCausalLM

    for model_cls in (LlavaLlamaForCausalLM, LlavaMistralForCausalLM):
        if not getattr(model_cls.from_pretrained, "_llava_patch_freeze", False):
            model_cls.from_pretrained = _wrap_from_pretrained(model_cls.from_pretrained)

    original = builder.load_pretrained_model
    if getattr(original, "_llava_patch", False):
        return
    patched = _wrap(original)
    builder.load_pretrained_model = patched
    for module in list(sys.modules.values()):
        name = getattr(module, "__name__", "")
        if name.startswith("llava.") and getattr(module, "load_pretrained_model", None) is original:
            module.load_pretrained_model = patched
