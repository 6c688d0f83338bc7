#!/usr/bin/env bash
# LLaVA-1.5 stage 2 with LoRA on the LLM (r 128, alpha 256, lr 2e-4; projector lr 2e-5) and a CLIP-MoE tower.
# Recipe: ZeRO-3, 16 per GPU, 128 per step, --image_aspect_ratio pad --group_by_modality_length True.
# Add --unfreeze_mm_vision_tower True to train the tower too (its MoE load-balancing loss is then added).
# Environment (defaults in brackets): NUM_GPUS [8], LLM [lmsys/vicuna-7b-v1.5], VISION_TOWER [clip-moe],
# PROJECTOR [./checkpoints/llava-v1.5-7b-clip-moe-pretrain/mm_projector.bin], DATA [./playground/data],
# OUTPUT [./checkpoints/llava-v1.5-7b-clip-moe-lora] (keep "llava" and "lora" in the name), ATTN [sdpa].
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
NUM_GPUS=${NUM_GPUS:-8}
PER_GPU=16
GLOBAL=128
DATA=${DATA:-./playground/data}
export LLAVA_ATTN_IMPLEMENTATION=${ATTN:-sdpa}
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

deepspeed --num_gpus "$NUM_GPUS" --module llava_patch.train \
    --deepspeed "$root/scripts/zero3.json" \
    --lora_enable True --lora_r 128 --lora_alpha 256 --mm_projector_lr 2e-5 \
    --model_name_or_path "${LLM:-lmsys/vicuna-7b-v1.5}" \
    --version v1 \
    --data_path "$DATA/llava_v1_5_mix665k.json" \
    --image_folder "$DATA" \
    --vision_tower "${VISION_TOWER:-clip-moe}" \
    --pretrain_mm_mlp_adapter "${PROJECTOR:-./checkpoints/llava-v1.5-7b-clip-moe-pretrain/mm_projector.bin}" \
    --mm_projector_type mlp2x_gelu \
    --mm_vision_select_layer -2 \
    --mm_use_im_start_end False \
    --mm_use_im_patch_token False \
    --image_aspect_ratio pad \
    --group_by_modality_length True \
    --bf16 True \
    --output_dir "${OUTPUT:-./checkpoints/llava-v1.5-7b-clip-moe-lora}" \
    --num_train_epochs 1 \
    --per_device_train_batch_size "$PER_GPU" \
    --gradient_accumulation_steps $((GLOBAL / (NUM_GPUS * PER_GPU))) \
    --save_strategy steps \
    --save_steps 50000 \
    --save_total_limit 1 \
    --learning_rate 2e-4 \
    --weight_decay 0. \
    --warmup_ratio 0.03 \
    --lr_scheduler_type cosine \
    --logging_steps 1 \
    --tf32 True \
    --model_max_length 2048 \
    --gradient_checkpointing True \
    --dataloader_num_workers 4 \
    --lazy_preprocess True \
    --report_to "${REPORT_TO:-none}" \
    "$@"
