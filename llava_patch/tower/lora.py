"""LoRA adapters on the language model only, also when the adapter is loaded back.

LLaVA's ``find_all_linear_names`` lists short module names (``q_proj``, ``k_proj`` ...). When the adapter is
loaded onto a model whose CLIP-MoE tower already exists, those names also match the tower's attention
layers, which then get empty adapters. A regular expression that excludes the multimodal modules is
returned instead (PEFT matches a string ``target_modules`` against full module names).
"""

import functools
import re
from typing import Any, Callable

from llava_patch.patching import wrap

_MULTIMODAL = ("mm_projector", "vision_tower", "vision_resampler")


def _wrap(original: Callable) -> Callable:
    @functools.wraps(original)
    def find_all_linear_names(model: Any) -> str:
        names = "|".join(re.escape(name) for name in sorted(original(model)))
        excluded = "|".join(_MULTIMODAL)
        return rf"^(?!.*\b(?:{excluded})\b).*\.(?:{names})$"

    return find_all_linear_names


def apply() -> None:
    """Replace ``llava.train.train.find_all_linear_names``."""
    import llava.train.train as train_module

    wrap(train_module, "find_all_linear_names", _wrap)
