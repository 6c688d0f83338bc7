#!/usr/bin/env bash
# LLaVA-1.5 stage 1 (feature alignment) with a CLIP-MoE vision tower: only the mlp2x_gelu projector trains.
# Recipe: ZeRO-2, lr 1e-3, 32 images per GPU, 256 per step (gradient accumulation fills in below 8 GPUs).
# Environment (defaults in brackets): NUM_GPUS [8], LLM [lmsys/vicuna-7b-v1.5], VISION_TOWER [clip-moe, i.e.
# $CLIP_MOE_PATH or ~/.cache/clip-moe/default], DATA [./playground/data/LLaVA-Pretrain],
# OUTPUT [./checkpoints/llava-v1.5-7b-clip-moe-pretrain], ATTN [sdpa; flash_attention_2 with flash-attn].
set -euo pipefail
PER_GPU=32
GLOBAL=256
DATA=${DATA:-./playground/data/LLaVA-Pretrain}
source "$(dirname "$0")/common.sh"

train_llava \
    --deepspeed "$root/scripts/zero2.json" \
    --version plain \
    --data_path "$DATA/blip_laion_cc_sbu_558k.json" \
    --image_folder "$DATA/images" \
    --tune_mm_mlp_adapter True \
    --output_dir "${OUTPUT:-./checkpoints/llava-v1.5-7b-clip-moe-pretrain}" \
    --save_steps 24000 \
    --learning_rate 1e-3 \
    "$@"
