#!/usr/bin/env bash
# DMU on one node with 8 GPUs. usage: scripts/dmu/launch_8gpu.sh [CONFIG] [--method dmu|upcycle|finetune|all]
# Run it again after a crash or kill: finished stages are skipped, an interrupted one resumes.
set -euo pipefail
config=${1:-configs/paper_vitl14_336_sharegpt4v.yaml}
shift || true
here=$(cd "$(dirname "$0")" && pwd)
if [ "${LAUNCHER:-accelerate}" = torchrun ]; then
  # torchrun alternative (Accelerate picks the process group up from the environment).
  exec torchrun --standalone --nproc_per_node 8 -m mllm_encoder dmu run "$config" "$@"
fi
exec accelerate launch --config_file "$here/accelerate_8gpu.yaml" -m mllm_encoder dmu run "$config" "$@"
