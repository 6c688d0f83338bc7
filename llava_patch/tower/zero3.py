"""DeepSpeed ZeRO-3 safety for LLaVA with CLIP-MoE towers.

* Recent DeepSpeed no longer casts the parameters of a ``zero.Init`` model to bf16/fp16, so the modules LLaVA
  builds after loading the LLM (projector, a trainable tower) keep their own dtype and ZeRO-3 fails with
  mixed-dtype parameter groups. Trainable parameters created outside ``zero.Init`` get the training dtype.
* Experts are stacked parameters of one module and every MoE layer's parameters are used on every call,
  so ranks that route differently gather the same parameters (no deadlock). Weights loaded by hand go
  through ``deepspeed.zero.GatheredParameters`` (:func:`load_state_dict_zero3_safe`).
* On the CPU accelerator the consolidated 16-bit state dict that ZeRO-3 saves holds views of the gather
  buffers (``.cpu()`` does not copy), which transformers < 4.40 drops as "shared tensors"; they are copied.
"""

import functools
import logging
from typing import Any, Callable, Dict

import torch
from torch import nn

from llava_patch.patching import wrap

logger = logging.getLogger(__name__)


def load_state_dict_zero3_safe(module: nn.Module, state_dict: Dict[str, torch.Tensor]) -> None:
    """``module.load_state_dict(state_dict)`` that also works when DeepSpeed ZeRO-3 has partitioned ``module``."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        module.load_state_dict(state_dict)
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        if deepspeed.comm.get_rank() == 0:
            module.load_state_dict(state_dict)


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


def _copy_consolidated_state_dict(original: Callable) -> Callable:
    @functools.wraps(original)
    def consolidated(self, *args: Any, **kwargs: Any):
        state_dict = original(self, *args, **kwargs)
        if not state_dict:
            return state_dict
        copies = {}  # one copy per tensor keeps tied weights tied
        return {key: copies.setdefault(id(value), value.clone()) for key, value in state_dict.items()}

    return consolidated


def _harmonize_before_train(original: Callable) -> Callable:
    @functools.wraps(original)
    def train(self, *args: Any, **kwargs: Any):
        harmonize_trainable_dtypes(self.model, training_dtype(self.args))
        return original(self, *args, **kwargs)

    return train


def apply() -> None:
    """Harmonise dtypes before DeepSpeed takes the model; copy the ZeRO-3 state dict on CPU."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from llava.train.llava_trainer import LLaVATrainer

    if not torch.cuda.is_available():
        wrap(DeepSpeedEngine, "_zero3_consolidated_16bit_state_dict", _copy_consolidated_state_dict)
    wrap(LLaVATrainer, "train", _harmonize_before_train)
