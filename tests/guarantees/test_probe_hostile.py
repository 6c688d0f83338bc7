"""The hostile probes of issues 9 and 20 end to end (``scripts/probe_hostile.py``): none may be bad."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "probe_hostile.py"


@pytest.mark.slow
def test_no_hostile_probe_is_handled_badly(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--keep", str(tmp_path / "probes")], capture_output=True, text=True, timeout=1800
    )
    summary = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 0 and summary.endswith(" 0 bad"), result.stdout[-3000:] + result.stderr[-2000:]
