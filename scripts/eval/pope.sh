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
CLIP_MOE=${CLIP_MOE:-clip-moe}
CKPT=$(basename "$MODEL_PATH")
IFS=',' read -ra GPULIST <<< "${CUDA_VISIBLE_DEVICES:-0}"
CHUNKS=${#GPULIST[@]}

SHARDS=()
PIDS=()
for IDX in $(seq 0 $((CHUNKS - 1))); do
    SHARD="$DATA/answers/$CKPT/${CHUNKS}_${IDX}.jsonl"
    SHARDS+=("$SHARD")
    CUDA_VISIBLE_DEVICES=${GPULIST[$IDX]} $CLIP_MOE eval answer \
        --model-path "$MODEL_PATH" \
        --question-file "$DATA/llava_pope_test.jsonl" \
        --image-folder "$DATA/val2014" \
        --answers-file "$SHARD" \
        --num-chunks "$CHUNKS" \
        --chunk-idx "$IDX" \
        --temperature 0 \
        --conv-mode vicuna_v1 \
        ${ANSWER_ARGS:-} &
    PIDS+=($!)
done
for PID in "${PIDS[@]}"; do
    wait "$PID"
done

$CLIP_MOE eval merge \
    --question-file "$DATA/llava_pope_test.jsonl" \
    --output "$DATA/answers/$CKPT.jsonl" \
    "${SHARDS[@]}"

$CLIP_MOE eval pope \
    --annotation-dir "$DATA/coco" \
    --question-file "$DATA/llava_pope_test.jsonl" \
    --result-file "$DATA/answers/$CKPT.jsonl" \
    --output "$DATA/answers/$CKPT.pope.json"
