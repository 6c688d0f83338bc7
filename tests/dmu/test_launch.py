"""Launch detection: what the environment says about the process count, and the one-line refusals."""

import re
from pathlib import Path

import pytest

from mllm_encoder.dmu.accelerator import LaunchError, check_launch, check_launch_environment, launched_world_size
from mllm_encoder.dmu.config import METHODS

TORCHRUN_RANK1 = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize(
    "env,expected",
    [
        ({}, 1),
        (TORCHRUN_RANK1, 2),
        ({"OMPI_COMM_WORLD_SIZE": "4"}, 4),
        ({"PMI_SIZE": "3"}, 3),
        ({"SLURM_NTASKS": "8", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3"}, 8),  # started by srun itself
        ({"SLURM_NTASKS": "2"}, 1),  # the sbatch script, not a process started by srun
        ({"SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "WORLD_SIZE": "16"}, 16),  # accelerate launch under srun
    ],
)
def test_launched_world_size(env, expected):
    assert launched_world_size(env) == expected


def test_a_launch_the_process_group_does_not_see_is_refused():
    check_launch(2, TORCHRUN_RANK1)
    check_launch(1, {})
    with pytest.raises(LaunchError, match=r"launcher started 2 process\(es\) but the process group has 1.*torchrun"):
        check_launch(1, TORCHRUN_RANK1)
    with pytest.raises(LaunchError, match="launcher started 1 process"):
        check_launch(2, {})
    with pytest.raises(LaunchError, match="started 4 process"):
        check_launch(1, {"SLURM_NTASKS": "4", "SLURM_STEP_ID": "0"})


def test_half_configured_launches_are_refused_before_the_group_forms():
    accelerate_cpu = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "ACCELERATE_USE_CPU": "True"}
    with pytest.raises(LaunchError, match="accelerate launch --cpu. with several processes starts only one"):
        check_launch_environment(accelerate_cpu)
    check_launch_environment({**accelerate_cpu, "OMPI_COMM_WORLD_SIZE": "2", "WORLD_SIZE": "2", "RANK": "0"})
    with pytest.raises(LaunchError, match="WORLD_SIZE=2 but RANK, MASTER_ADDR, MASTER_PORT not set"):
        check_launch_environment({"WORLD_SIZE": "2"})
    with pytest.raises(LaunchError, match="WORLD_SIZE='two' is not an integer"):
        launched_world_size({"WORLD_SIZE": "two"})


def test_deepspeed_without_cuda_is_refused(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(LaunchError, match="DeepSpeed runs of the DMU pipeline need CUDA"):
        check_launch_environment({**TORCHRUN_RANK1, "ACCELERATE_USE_DEEPSPEED": "true"})


def test_launch_8gpu_usage_lists_every_method():
    """The usage line of scripts/dmu/launch_8gpu.sh names every ``dmu run --method`` choice (issue 23)."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "dmu" / "launch_8gpu.sh"
    usage = re.search(r"--method ([a-z|]+)\]", script.read_text()).group(1)
    assert usage.split("|") == [*METHODS, "all"]


def test_the_process_group_timeout_reaches_the_process_group_init():
    """``runtime.process_group_timeout_s`` is what accelerate passes to ``init_process_group`` (default 2 h)."""
    from datetime import timedelta

    from mllm_encoder.dmu.accelerator import build_accelerator
    from mllm_encoder.dmu.config import RuntimeSection

    assert RuntimeSection().process_group_timeout_s == 7200
    accelerator = build_accelerator("no", process_group_timeout_s=123)
    assert accelerator.init_handler.to_kwargs() == {"timeout": timedelta(seconds=123)}
