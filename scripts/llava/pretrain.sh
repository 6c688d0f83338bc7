#!/usr/bin/env bash
# LLaVA-1.5 stage 1 (feature alignment) with a CLIP-MoE vision tower: only the mlp2x_gelu projector trains.
# Recipe: ZeRO-2, lr 1e-3, 32 images per GPU, 256 per step (gradient accumulation fills in below 8 GPUs).
# Environment (defaults in brackets): NUM_GPUS [8], LLM [lmsys/vicuna-7b-v1.5], VISION_TOWER [clip-moe, i.e.
# $CLIP_MOE_PATH or ~/.cache/clip-moe/default], DATA [./playground/data/LLaVA-Pretrain],
# OUTPUT [./checkpoints/llava-v1.5-7b-clip-moe-pretrain], ATTN [sdpa; flash_attention_2 with flash-attn].
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
NUM_GPUS=${NUM_GPUS:-8}
PER_GPU=32
GLOBAL=256
DATA=${DATA:-./playground/data/LLaVA-Pretrain}
export LLAVA_ATTN_IMPLEMENTATION=${ATTN:-sdpa}
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

deepspeed --num_gpus "$NUM_GPUS" --module llava_patch.train \
    --deepspeed "$root/scripts/zero2.json" \
    --model_name_or_path "${LLM:-lmsys/vicuna-7b-v1.5}" \
    --version plain \
    --data_path "$DATA/blip_laion_cc_sbu_558k.json" \
    --image_folder "$DATA/images" \
    --vision_tower "${VISION_TOWER:-clip-moe}" \
    --mm_projector_type mlp2x_gelu \
    --tune_mm_mlp_adapter True \
    --mm_vision_select_layer -2 \
    --mm_use_im_start_end False \
    --mm_use_im_patch_token False \
    --bf16 True \
    --output_dir "${OUTPUT:-./checkpoints/llava-v1.5-7b-clip-moe-pretrain}" \
    --num_train_epochs 1 \
    --per_device_train_batch_size "$PER_GPU" \
    --gradient_accumulation_steps $((GLOBAL / (NUM_GPUS * PER_GPU))) \
    --save_strategy steps \
    --save_steps 24000 \
    --save_total_limit 1 \
    --learning_rate 1e-3 \
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
