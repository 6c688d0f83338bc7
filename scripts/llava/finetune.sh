#!/usr/bin/env bash
# LLaVA-1.5 stage 2 (visual instruction tuning) with a CLIP-MoE vision tower: LLM + projector train.
# Recipe: ZeRO-3, lr 2e-5, 16 per GPU, 128 per step, --image_aspect_ratio pad --group_by_modality_length True.
# Add --unfreeze_mm_vision_tower True to train the tower too (its MoE load-balancing loss is then added).
# Environment (defaults in brackets): NUM_GPUS [8], LLM [lmsys/vicuna-7b-v1.5], VISION_TOWER [clip-moe],
# PROJECTOR [./checkpoints/llava-v1.5-7b-clip-moe-pretrain/mm_projector.bin], DATA [./playground/data],
# OUTPUT [./checkpoints/llava-v1.5-7b-clip-moe], ATTN [sdpa].
set -euo pipefail
source "$(dirname "$0")/finetune_common.sh"

train_llava \
    --deepspeed "$root/scripts/zero3.json" \
    "${FINETUNE_ARGS[@]}" \
    --output_dir "${OUTPUT:-./checkpoints/llava-v1.5-7b-clip-moe}" \
    --learning_rate 2e-5 \
    "$@"
