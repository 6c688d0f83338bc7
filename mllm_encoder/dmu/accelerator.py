"""One Hugging Face ``Accelerator`` per process: DDP (or DeepSpeed from the accelerate config) and autocast."""

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs

PRECISIONS = ("auto", "no", "bf16", "fp16")


def resolve_mixed_precision(mixed_precision: str = "auto") -> str:
    """``auto``: bf16 on a GPU that supports it, fp16 on other GPUs, none on CPU."""
    if mixed_precision not in PRECISIONS:
        raise ValueError(f"mixed_precision must be one of {PRECISIONS}, got {mixed_precision!r}")
    if mixed_precision != "auto":
        return mixed_precision
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def build_accelerator(mixed_precision: str = "auto", find_unused_parameters: bool = False) -> Accelerator:
    """The accelerator for every stage of a run (launch with ``accelerate launch`` or ``torchrun`` for many GPUs)."""
    ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)
    return Accelerator(mixed_precision=resolve_mixed_precision(mixed_precision), kwargs_handlers=[ddp])
