"""One Hugging Face ``Accelerator`` per process, checked against how the job was launched.

DMU runs under ``accelerate launch``, ``torchrun`` (one node or several) and SLURM (``srun`` starting one
launcher per node). A launch that the accelerator does not see as such (e.g. ``accelerate launch --cpu
--num_processes 2``, which starts a single process, or a process group that failed to form) would have every
process believe it is rank 0 and race on the same files, so :func:`check_launch` stops such a run at once,
before anything is written. On machines without CUDA, several processes use the CPU/gloo backend.
"""

import logging
import os
from datetime import timedelta
from typing import Mapping, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

from mllm_encoder.dmu.config import PRECISIONS, RuntimeSection

logger = logging.getLogger(__name__)

HOW_TO_LAUNCH = (
    "launch several processes with `torchrun --nproc_per_node N -m mllm_encoder dmu ...` or "
    "`accelerate launch --num_processes N [--multi_gpu] -m mllm_encoder dmu ...` (see docs/dmu.md)"
)


class LaunchError(ValueError):
    """The environment and the process group disagree on how many processes run."""


def _int_env(env: Mapping[str, str], name: str) -> Optional[int]:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"environment variable {name}={value!r} is not an integer") from None


def launched_world_size(env: Mapping[str, str] = os.environ) -> int:
    """How many processes the launcher says this job has (1 when nothing says otherwise).

    ``WORLD_SIZE`` (torchrun, ``accelerate launch``, the DeepSpeed launcher) wins; without it, MPI's
    ``OMPI_COMM_WORLD_SIZE`` / ``PMI_SIZE`` and SLURM's ``SLURM_NTASKS`` (with ``SLURM_STEP_ID``: a process
    started by ``srun`` itself) count, since each of those started this many processes of ours.
    """
    world_size = _int_env(env, "WORLD_SIZE")
    if world_size is not None:
        return world_size
    for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        size = _int_env(env, name)
        if size is not None:
            return size
    if env.get("SLURM_STEP_ID") is not None:
        return _int_env(env, "SLURM_NTASKS") or 1
    return 1


def check_launch_environment(env: Mapping[str, str] = os.environ) -> None:
    """Raise :class:`LaunchError` for launches that cannot form the intended process group (checked before
    the group is formed: a half-configured one would wait for peers that never come)."""
    if _int_env(env, "WORLD_SIZE") is None and env.get("MASTER_ADDR") and env.get("ACCELERATE_USE_CPU") == "True":
        mpi = any(env.get(name) for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE"))
        if not mpi:
            raise LaunchError(
                "`accelerate launch --cpu` with several processes starts only one process (it needs "
                f"--mpirun_hostfile for several CPU processes); {HOW_TO_LAUNCH}"
            )
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and not torch.cuda.is_available():
        raise LaunchError(
            "DeepSpeed runs of the DMU pipeline need CUDA GPUs (accelerate forms no DeepSpeed process group "
            f"on CPU); for CPU runs drop the DeepSpeed config and {HOW_TO_LAUNCH}"
        )
    expected = launched_world_size(env)
    if expected > 1 and _int_env(env, "WORLD_SIZE") is not None:
        missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not env.get(name)]
        if missing:
            raise LaunchError(f"WORLD_SIZE={expected} but {', '.join(missing)} not set; {HOW_TO_LAUNCH}")


def check_launch(num_processes: int, env: Mapping[str, str] = os.environ) -> None:
    """Raise :class:`LaunchError` (one line, with how to launch) when the launch and the process group differ."""
    check_launch_environment(env)
    expected = launched_world_size(env)
    if expected != num_processes:
        raise LaunchError(
            f"the launcher started {expected} process(es) but the process group has {num_processes}: "
            f"every process would act as rank 0; {HOW_TO_LAUNCH}"
        )


def resolve_mixed_precision(mixed_precision: str = "auto") -> str:
    """``auto``: bf16 on a GPU that supports it, fp16 on other GPUs, none on CPU."""
    if mixed_precision not in PRECISIONS:
        raise ValueError(f"mixed_precision must be one of {PRECISIONS}, got {mixed_precision!r}")
    if mixed_precision != "auto":
        return mixed_precision
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def build_accelerator(
    mixed_precision: str = "auto",
    find_unused_parameters: bool = False,
    process_group_timeout_s: int = RuntimeSection.process_group_timeout_s,
) -> Accelerator:
    """The accelerator for every stage of a run, after checking the launch (see :func:`check_launch`).

    Without CUDA, the processes of a multi-process launch form a CPU/gloo group (no extra variable needed);
    its collectives wait ``process_group_timeout_s`` seconds for the other processes.
    """
    check_launch_environment()
    ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=process_group_timeout_s))
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(mixed_precision),
        kwargs_handlers=[ddp, timeout],
        cpu=not torch.cuda.is_available(),
    )
    check_launch(accelerator.num_processes)
    logger.info(
        "process %d of %d (%s, %s, mixed precision %s)",
        accelerator.process_index,
        accelerator.num_processes,
        accelerator.distributed_type.value,
        accelerator.device,
        accelerator.mixed_precision,
    )
    return accelerator
