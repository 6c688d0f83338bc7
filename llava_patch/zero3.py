"""DeepSpeed ZeRO-3 safety for LLaVA with CLIP-MoE towers.

* Recent DeepSpeed no longer casts the parameters of a ``zero.Init`` model to bf16/fp16, so the modules LLaVA
  builds after loading the LLM (projector, a trainable tower) keep their own dtype and ZeRO-3 fails with
  mixed-dtype parameter groups. Trainable parameters created outside ``zero.Init`` get the training dtype.
* Experts are stacked parameters of one module and every MoE layer's parameters are used on every call,
  so ranks that route differently gather the same parameters (no deadlock). Weights loaded by hand go
  through ``deepspeed.zero.GatheredParameters`` (:func:`mllm_encoder.vision_tower.load_state_dict_zero3_safe`).
* On the CPU accelerator the consolidated 16-bit state dict that ZeRO-3 saves holds views of the gather
  buffers (``.cpu()`` does not copy), which transformers < 4.40 drops as "shared tensors"; they are copied.
"""

import functools
import logging
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


def training_dtype(args: Any) -> torch.dtype:
    """The parameter dtype DeepSpeed trains in for these ``TrainingArguments``."""
    if getattr(args, "bf16", False):
        return torch.bfloat16
    if getattr(args, "fp16", False):
        return torch.float16
    return torch.float32


def harmonize_trainable_dtypes(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast trainable floating parameters that ZeRO-3 has not partitioned to ``dtype``; returns how many."""
    if not any(hasattr(p, "ds_id") for p in model.parameters()):
        return 0
    cast = 0
    for param in model.parameters():
        if param.requires_grad and not hasattr(param, "ds_id") and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            cast += 1
    if cast:
        logger.info("ZeRO-3: cast %d trainable parameters created outside zero.Init to %s", cast, dtype)
    return cast


def _copy_consolidated_state_dict() -> None:
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = DeepSpeedEngine._zero3_consolidated_16bit_state_dict
    if getattr(original, "_llava_patch", False):
        return

    @functools.wraps(original)
    def consolidated(self, *args: Any, **kwargs: Any):
        state_dict = original(self, *args, **kwargs)
        if not state_dict:
            return state_dict
        copies = {}  # one copy per tensor keeps tied weights tied
        return {key: copies.setdefault(id(value), value.clone()) for key, value in state_dict.items()}

    consolidated._llava_patch = True
    DeepSpeedEngine._zero3_consolidated_16bit_state_dict = consolidated


def apply() -> None:
    """Harmonise dtypes before DeepSpeed takes the model; copy the ZeRO-3 state dict on CPU."""
    from llava.train.llava_trainer import LLaVATrainer

    if not torch.cuda.is_available():
        _copy_consolidated_state_dict()

    original = LLaVATrainer.train
    if getattr(original, "_llava_patch", False):
        return

    @functools.wraps(original)
    def train(self, *args: Any, **kwargs: Any):
        harmonize_trainable_dtypes(self.model, training_dtype(self.args))
        return original(self, *args, **kwargs)

    train._llava_patch = True
    LLaVATrainer.train = train
