"""The run directory's bookkeeping: atomic JSON, the manifest of finished stages, resumable training state."""

import json
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from safetensors.torch import load_file, save_file

from mllm_encoder.atomic import atomic_directory, atomic_write_json

STATE_PREFIX = "step_"


class Manifest:
    """``manifest.json``: which stages of a run are finished, with what they produced, and (for a DMU run) the
    config they were run with (``config``, None until recorded).

    Only the main process writes (``writable``); the others keep the same record in memory.
    """

    def __init__(self, path: Union[str, Path], writable: bool = True) -> None:
        self.path, self.writable = Path(path), writable
        self.stages: Dict[str, Dict[str, Any]] = {}
        self.config: Optional[Dict[str, Any]] = None
        if self.path.exists():
            try:
                saved = json.loads(self.path.read_text())
                self.stages, self.config = saved["stages"], saved.get("config")
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
                raise ValueError(f"{self.path}: not a run manifest ({error})") from error

    def record_config(self, config: Dict[str, Any]) -> None:
        """Record the config the run's stages use (written at once)."""
        self.config = config
        self._write()

    def _write(self) -> None:
        if self.writable:
            config = {} if self.config is None else {"config": self.config}
            atomic_write_json(self.path, {**config, "stages": self.stages})

    def is_done(self, stage: str) -> bool:
        return stage in self.stages

    def result(self, stage: str) -> Dict[str, Any]:
        return self.stages[stage]

    def mark_done(self, stage: str, **info: Any) -> None:
        self.stages[stage] = info
        self._write()


def _trainable_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {name: param.detach().cpu().contiguous() for name, param in model.named_parameters() if param.requires_grad}


def save_training_state(
    ckpt_dir: Union[str, Path],
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    history: List[Dict[str, float]],
    keep: int = 1,
    world_size: int = 1,
) -> Path:
    """Save trainable weights, optimizer state, RNG and history after ``step`` steps, atomically.

    The state is written to a uniquely named staging directory (:func:`~mllm_encoder.atomic.atomic_directory`)
    that becomes ``step_{step:08d}`` when complete; older states beyond ``keep`` are removed afterwards, so a
    kill at any moment leaves a complete state on disk.
    """
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"{STATE_PREFIX}{step:08d}"
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    with atomic_directory(final, overwrite=True) as staging:
        save_file(_trainable_state(model), str(staging / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "rng": rng}, staging / "optimizer.pt")
        atomic_write_json(staging / "state.json", {"step": step, "world_size": world_size, "history": history})
    for old in sorted(ckpt_dir.glob(f"{STATE_PREFIX}*[0-9]"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_training_state(ckpt_dir: Union[str, Path]) -> Optional[Path]:
    """The newest complete state directory in ``ckpt_dir`` (temporary ones are ignored)."""
    states = sorted(Path(ckpt_dir).glob(f"{STATE_PREFIX}*[0-9]")) if Path(ckpt_dir).exists() else []
    return states[-1] if states else None


def load_training_state(
    state_dir: Union[str, Path], model: torch.nn.Module, optimizer: torch.optim.Optimizer, world_size: int = 1
) -> Tuple[int, List[Dict[str, float]]]:
    """Restore what :func:`save_training_state` wrote; returns (step, history).

    The data position is a step count over global batches of ``batch_size x world_size``, so a state only
    resumes with the number of processes that saved it.
    """
    state_dir = Path(state_dir)
    meta = json.loads((state_dir / "state.json").read_text())
    if meta.get("world_size", 1) != world_size:
        raise ValueError(
            f"{state_dir}: saved by {meta.get('world_size', 1)} processes, resumed with {world_size}; "
            "relaunch with the same number of processes (or delete the state to restart the stage)"
        )
    weights = load_file(str(state_dir / "trainable.safetensors"))
    missing = [name for name, p in model.named_parameters() if p.requires_grad and name not in weights]
    if missing:
        raise ValueError(f"{state_dir}: training state lacks trainable parameters {missing[:5]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    saved = torch.load(state_dir / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"]["torch"])
    if "cuda" in saved["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["rng"]["cuda"])
    return int(meta["step"]), list(meta["history"])
