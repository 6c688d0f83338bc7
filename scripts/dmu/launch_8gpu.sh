#!/usr/bin/env bash
# DMU on one node with 8 GPUs. usage: scripts/dmu/launch_8gpu.sh [CONFIG] [--method finetune|upcycle|dmu|control|all]
# Run it again after a crash or kill: finished stages are skipped, an interrupted one resumes.
# NPROC changes the process count (default 8); LAUNCHER=torchrun uses torchrun instead of accelerate.
set -euo pipefail
config=${1:-configs/paper_vitl14_336_sharegpt4v.yaml}
shift || true
here=$(cd "$(dirname "$0")" && pwd)
nproc=${NPROC:-8}
if [ "${LAUNCHER:-accelerate}" = torchrun ]; then
  exec torchrun --standalone --nproc_per_node "$nproc" -m mllm_encoder dmu run "$config" "$@"
fi
exec accelerate launch --config_file "$here/accelerate_8gpu.yaml" --num_processes "$nproc" \
  -m mllm_encoder dmu run "$config" "$@"
