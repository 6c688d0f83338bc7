#!/bin/bash
# MME for a LLaVA checkpoint with a CLIP-MoE (or CLIP) vision tower, with the official protocol:
# answer llava_mme.jsonl (temperature 0, vicuna_v1, one shard per GPU, resumable), merge the shards, score
# like LLaVA's convert_answer_to_mme.py + MME's eval_tool/calculation.py and print the table
# (LLaVA-1.5 reports the perception total).
#
#   bash scripts/eval/mme.sh CHECKPOINT [DATA_DIR]
#
# CHECKPOINT: a LLaVA checkpoint directory whose name contains "llava" (LLaVA's loader needs it).
# DATA_DIR (default ./playground/data/eval/MME): llava_mme.jsonl and MME_Benchmark_release_version/
# (the MME release, images and ground truth). GPUs: CUDA_VISIBLE_DEVICES (default 0).
# Re-running after a crash resumes every shard where it stopped.
set -euo pipefail

MODEL_PATH=${1:?usage: bash scripts/eval/mme.sh CHECKPOINT [DATA_DIR]}
DATA=${2:-./playground/data/eval/MME}
source "$(dirname "$0")/answer_sharded.sh"

answer_sharded "$DATA/llava_mme.jsonl" "$DATA/MME_Benchmark_release_version"

$CLIP_MOE eval mme \
    --mme-root "$DATA/MME_Benchmark_release_version" \
    --question-file "$DATA/llava_mme.jsonl" \
    --result-file "$DATA/answers/$CKPT.jsonl" \
    --output "$DATA/answers/$CKPT.mme.json"
