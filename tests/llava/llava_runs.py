"""Helpers for the LLaVA training tests: launch ``python -m llava_patch.train`` on CPU and read its log."""

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

from process_helpers import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_train(workdir: Path, args: List[str], nproc: int = 1, timeout: int = 600) -> str:
    """Run ``python -m llava_patch.train ARGS`` on CPU with DeepSpeed (``nproc`` processes); returns the log."""
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]),
        # DeepSpeed compiles its CPU communication op once per environment; keep it with the venv.
        TORCH_EXTENSIONS_DIR=env.get("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions")),
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    port = str(free_port())
    if nproc == 1:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        command = [sys.executable, "-m", "llava_patch.train"]
    else:
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
            env.pop(key, None)
        launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}"]
        command = [sys.executable, *launcher, "-m", "llava_patch.train"]
    result = subprocess.run(command + args, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    return log


def common_args(
    workdir: Path, output_dir: str, stage: str, deepspeed: Optional[str] = "zero3.json", tower: str = "clipmoe"
) -> List[str]:
    """LLaVA-1.5 arguments for a 2-step run of ``stage`` ("pretrain" or "finetune") on the synthetic data, with
    the vision tower in ``workdir / tower``; it saves a checkpoint after every step (:func:`saved_checkpoint`)."""
    data = workdir / "data"
    args = [
        "--model_name_or_path", str(workdir / "llm"),
        "--vision_tower", f"clip-moe:{workdir / tower}",
        "--mm_projector_type", "mlp2x_gelu",
        "--mm_vision_select_layer", "-2",
        "--mm_use_im_start_end", "False",
        "--mm_use_im_patch_token", "False",
        "--image_folder", str(data / "images"),
        "--output_dir", str(workdir / output_dir),
        "--max_steps", "2",
        "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "1",
        "--save_strategy", "steps",  # as scripts/llava/common.sh, with a save step within max_steps
        "--save_steps", "1",
        "--save_total_limit", "1",
        "--logging_steps", "1",
        "--model_max_length", "256",
        "--dataloader_num_workers", "0",
        "--report_to", "none",
        "--seed", "0",
    ]  # fmt: skip
    if deepspeed:
        args += ["--deepspeed", str(REPO_ROOT / "scripts" / deepspeed)]
    if stage == "pretrain":
        return args + ["--version", "plain", "--data_path", str(data / "pretrain.json"),
                       "--tune_mm_mlp_adapter", "True", "--learning_rate", "1e-3"]  # fmt: skip
    return args + ["--version", "v1", "--data_path", str(data / "finetune.json"), "--image_aspect_ratio", "pad",
                   "--group_by_modality_length", "True", "--learning_rate", "2e-5"]  # fmt: skip


def saved_checkpoint(output_dir: Path, step: int = 2) -> Path:
    """The ``checkpoint-STEP`` folder the Trainer saved during the run (asserted to hold files)."""
    checkpoint = output_dir / f"checkpoint-{step}"
    assert checkpoint.is_dir() and any(checkpoint.iterdir()), sorted(p.name for p in output_dir.iterdir())
    return checkpoint


def logged_losses(log: str) -> List[float]:
    """The ``loss`` values the Trainer logged."""
    return [float(value) for value in re.findall(r"'loss': '?([0-9.eE+-]+|nan)'?", log)]
