#!/usr/bin/env bash
# Create (or update) the lmms-eval environment: lmms-eval 0.7.3 with the clip_moe_llava plug-in (make test-lmms).
# usage: scripts/setup_lmms_env.sh VENV_DIR
# The pip lines are the install lines of docs/evaluation.md ("The lmms-eval plug-in"), word for word:
# requirements/constraints.txt keeps the CPU build of torch 2.13.0 (as for make setup), requirements/lmms-eval.txt
# resolves lmms-eval 0.7.3's conflicts (filelock, protobuf/sentencepiece; see that file).
set -euo pipefail
venv=$1
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
python=${PYTHON:-python3}

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip() { "$venv/bin/python" -m pip "$@"; }
pip install -c requirements/constraints.txt -c requirements/lmms-eval.txt torch==2.13.0
pip install -c requirements/constraints.txt -c requirements/lmms-eval.txt lmms-eval==0.7.3 -e ".[llava,lmms-eval,dev]"
pip install --no-deps llava-torch==1.2.2.post1
"$venv/bin/python" scripts/patch_torchvision.py
"$venv/bin/python" -c "import lmms_eval.evaluator, llava_patch.integrations.lmms_eval_model; print('$venv: lmms-eval ready')"
