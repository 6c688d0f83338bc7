#!/usr/bin/env bash
# LLaVA-1.5 stage 2, QLoRA: the LLM in 4 bits with LoRA (r 128, alpha 256, lr 2e-4; projector lr 2e-5);
# the CLIP-MoE tower and the projector stay in bf16.
# Recipe: ZeRO-2 (bitsandbytes weights do not partition), 16 per GPU, 128 per step,
# --image_aspect_ratio pad --group_by_modality_length True.
# Add --unfreeze_mm_vision_tower True to train the tower too (its MoE load-balancing loss is then added).
# Environment (defaults in brackets): NUM_GPUS [8], LLM [lmsys/vicuna-7b-v1.5], VISION_TOWER [clip-moe],
# PROJECTOR [./checkpoints/llava-v1.5-7b-clip-moe-pretrain/mm_projector.bin], DATA [./playground/data],
# OUTPUT [./checkpoints/llava-v1.5-7b-clip-moe-qlora] (keep "llava" and "lora" in the name), ATTN [sdpa].
set -euo pipefail
source "$(dirname "$0")/finetune_common.sh"

train_llava \
    --deepspeed "$root/scripts/zero2.json" \
    --bits 4 --lora_enable True --lora_r 128 --lora_alpha 256 --mm_projector_lr 2e-5 \
    "${FINETUNE_ARGS[@]}" \
    --output_dir "${OUTPUT:-./checkpoints/llava-v1.5-7b-clip-moe-qlora}" \
    --learning_rate 2e-4 \
    "$@"
