"""``python -m llava_patch.train ARGS``: LLaVA-1.5's ``llava/train/train.py`` with CLIP-MoE towers.

Takes the arguments of ``llava/train/train.py`` plus ``--unfreeze_mm_vision_tower`` (flags that newer
transformers renamed are translated); launch it with ``deepspeed --module`` or ``torchrun -m`` like LLaVA's
script. ``LLAVA_ATTN_IMPLEMENTATION`` picks the attention (``flash_attention_2`` like ``train_mem.py``).
"""

import os
import sys

import torch

import llava_patch
from llava_patch.compat.trainer import translate_arguments


def _init_cpu_deepspeed() -> None:
    """Several CPU processes under DeepSpeed: start its gloo communicator before ``zero.Init`` needs it."""
    if torch.cuda.is_available() or "--deepspeed" not in " ".join(sys.argv):
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")


def main() -> None:
    """Patch LLaVA, then run its ``train()`` unchanged."""
    llava_patch.apply()
    sys.argv[1:] = translate_arguments(sys.argv[1:])
    _init_cpu_deepspeed()
    from llava.train.train import train

    train(attn_implementation=os.environ.get("LLAVA_ATTN_IMPLEMENTATION") or None)
    # Join the communicator's threads before the interpreter exits (CPU ranks otherwise abort at exit).
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
