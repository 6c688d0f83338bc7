#!/usr/bin/env bash
# The one device check of issue 13, for a lent GPU machine that starts bare (torch, transformers, accelerate,
# triton present; no project install): the GPU tests, then the benchmark, each under its own time limit,
# their outputs under $OUT (default ./gpu_check). About 9 minutes at most; runs unchanged on CPU (the GPU
# tests skip there, and BENCH_ARGS="--size tiny" keeps the benchmark short).
#
#   bash scripts/gpu_check.sh                        # on the GPU machine, from the repository root
#
# pytest is not on the bare machine: before the call, `pip download pytest iniconfig pluggy packaging -d
# .gpu_wheels` here (ignored by git) and carry `.gpu_wheels`; this script installs from it, offline.
set -u
PYTHON="${PYTHON:-python}"
OUT="${OUT:-gpu_check}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"
    "$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
} > "$OUT/device.txt" 2>&1
if ! "$PYTHON" -c "import pytest" 2>/dev/null && [ -d .gpu_wheels ]; then
    "$PYTHON" -m pip install -q --no-index --find-links .gpu_wheels pytest >> "$OUT/device.txt" 2>&1
fi
timeout "${TESTS_SECONDS:-150}" "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests/moe/test_moe_gpu.py \
    > "$OUT/gpu_tests.txt" 2>&1
echo "gpu tests: exit $?" | tee -a "$OUT/device.txt"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
timeout "${BENCH_SECONDS:-420}" "$PYTHON" scripts/bench_moe.py ${BENCH_ARGS:-} > "$OUT/bench.md" 2>&1
echo "bench: exit $?" | tee -a "$OUT/device.txt"
