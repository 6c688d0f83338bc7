"""``--bits 4/8`` and ``load_4bit/load_8bit`` with CLIP-MoE towers on transformers 4.37 to 5.x.

transformers 5 removed ``from_pretrained(load_in_4bit=/load_in_8bit=)``; LLaVA passes them (in training
next to a ``quantization_config``). They become a ``BitsAndBytesConfig``. The vision tower is kept out of
quantisation (it is built inside the model when a LLaVA checkpoint is loaded), like the projector; a
config without skip list also keeps ``lm_head``, which transformers skips by default. As transformers 4.x
did, a quantised load without a dtype loads the remaining weights in float16. :mod:`llava_patch.tower.loading` applies
:func:`quantization_kwargs` in its ``from_pretrained`` of LLaVA's model classes.
"""

from typing import Any, Dict

import torch

# Full names from the model root: transformers 5 matches skip patterns from the start of a module name.
_SKIPPED_MODULES = ("model.mm_projector", "model.vision_tower")


def _quantization_config(kwargs: dict) -> Any:
    from transformers import BitsAndBytesConfig  # imports bitsandbytes (optional) when it is installed

    load_in_4bit = bool(kwargs.pop("load_in_4bit", False))
    load_in_8bit = bool(kwargs.pop("load_in_8bit", False))
    config = kwargs.get("quantization_config")
    if config is None and (load_in_4bit or load_in_8bit):
        config = BitsAndBytesConfig(load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit)
    if isinstance(config, BitsAndBytesConfig):
        skipped = list(config.llm_int8_skip_modules or ["lm_head"])
        config.llm_int8_skip_modules = skipped + [name for name in _SKIPPED_MODULES if name not in skipped]
    return config


def quantization_kwargs(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """``from_pretrained`` keyword arguments with ``load_in_4bit/8bit`` as a ``quantization_config`` that skips
    the projector and the vision tower (float16 unless a dtype is given)."""
    kwargs = dict(kwargs)
    config = _quantization_config(kwargs)
    if config is not None:
        kwargs["quantization_config"] = config
        if kwargs.get("torch_dtype") is None and kwargs.get("dtype") is None:
            kwargs["torch_dtype"] = torch.float16
    return kwargs
