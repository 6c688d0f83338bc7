#!/bin/bash
# POPE for a LLaVA checkpoint with a CLIP-MoE (or CLIP) vision tower, with LLaVA-1.5's protocol:
# answer llava_pope_test.jsonl (temperature 0, vicuna_v1, one shard per GPU, resumable), merge the shards,
# score with eval_pope.py's rules and print the table (headline: mean F1 over the three splits).
#
#   bash scripts/eval/pope.sh CHECKPOINT [DATA_DIR]
#
# CHECKPOINT: a LLaVA checkpoint directory whose name contains "llava" (LLaVA's loader needs it).
# DATA_DIR (default ./playground/data/eval/pope): llava_pope_test.jsonl, coco/coco_pope_*.json
# (POPE commit e3e39262) and val2014/ (COCO val2014 images). GPUs: CUDA_VISIBLE_DEVICES (default 0).
# Re-running after a crash resumes every shard where it stopped.
set -euo pipefail

MODEL_PATH=${1:?usage: bash scripts/eval/pope.sh CHECKPOINT [DATA_DIR]}
DATA=${2:-./playground/data/eval/pope}
source "$(dirname "$0")/answer_sharded.sh"

answer_sharded "$DATA/llava_pope_test.jsonl" "$DATA/val2014"

$CLIP_MOE eval pope \
    --annotation-dir "$DATA/coco" \
    --question-file "$DATA/llava_pope_test.jsonl" \
    --result-file "$DATA/answers/$CKPT.jsonl" \
    --output "$DATA/answers/$CKPT.pope.json"
