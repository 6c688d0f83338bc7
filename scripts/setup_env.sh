#!/usr/bin/env bash
# Create (or update) one virtual environment for mllm-encoder.
# usage: scripts/setup_env.sh VENV_DIR REQUIREMENTS_FILE
# Every pip call runs under requirements/constraints.txt so that torch stays the
# CPU build (2.13.0) and torchvision matches it; see that file.
set -euo pipefail
venv=$1
requirements=$2
root=$(cd "$(dirname "$0")/.." && pwd)
export PIP_CONSTRAINT="$root/requirements/constraints.txt"
export PIP_DISABLE_PIP_VERSION_CHECK=1
python=${PYTHON:-python3}

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip() { "$venv/bin/python" -m pip "$@"; }
pip install -q torch==2.13.0
pip install -q -r "$requirements" -e "$root[dmu,convert,llava,quant,dev]"
# llava-torch pins torch 2.0.1 / transformers 4.36.2: take its code, not its pins.
pip install -q --no-deps llava-torch==1.2.2.post1
"$venv/bin/python" "$root/scripts/patch_torchvision.py"
"$venv/bin/python" -c "import mllm_encoder, torchvision, transformers; print('$venv: transformers', transformers.__version__)"
