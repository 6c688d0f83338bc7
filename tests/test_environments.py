"""A checkpoint moves between the two supported environments (issue 23): written in ``.venv`` (transformers 5)
it loads in ``.venv-compat`` (transformers 4.37.2, LLaVA-1.5's pins) and the other way round, giving the same
token ids (fast and slow tokenizer) and features in both. The other environment's python runs
``tests/portability_probe.py`` as a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from portability_probe import read, write

REPO_ROOT = Path(__file__).resolve().parents[1]
OTHER_VENV = ".venv-compat" if int(transformers.__version__.split(".")[0]) >= 5 else ".venv"


def other_python() -> Path:
    """The other environment's python: ``OTHER_VENV`` at the repository root (a clone, CI), else beside this
    environment (a git worktree running the main checkout's environments)."""
    for root in (REPO_ROOT, Path(sys.prefix).parent):
        python = root / OTHER_VENV / "bin" / "python"
        if (root / OTHER_VENV / ".installed").exists() and python.exists():
            return python
    pytest.skip(f"the other environment ({OTHER_VENV}, built by `make setup`) is absent at {REPO_ROOT}")


def assert_same(reference: dict, other: dict) -> None:
    assert reference["transformers"] != other["transformers"]  # really two environments
    assert other["ids"] == other["slow_ids"] == reference["ids"] == reference["slow_ids"]
    for key in ("image_features", "text_features"):
        torch.testing.assert_close(torch.tensor(other[key]), torch.tensor(reference[key]), rtol=0, atol=1e-6)


def test_checkpoints_load_in_the_other_environment_both_ways(tmp_path):
    python = other_python()
    write(tmp_path / "written-here")
    files = {path.name for path in (tmp_path / "written-here").iterdir()}
    assert {"tokenizer.json", "vocab.json", "merges.txt"} <= files  # as hub CLIP directories hold them
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")]))
    command = [str(python), str(REPO_ROOT / "tests" / "portability_probe.py")]
    command += [str(tmp_path / "written-here"), str(tmp_path / "written-there"), str(tmp_path / "there.json")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    there = json.loads((tmp_path / "there.json").read_text())
    assert_same(read(tmp_path / "written-here"), there["elsewhere"])  # written here, read there
    assert_same(there["here"], read(tmp_path / "written-there"))  # written there, read here
