# Sourced (not run) by scripts/llava/finetune*.sh: LLaVA-1.5 stage 2 (visual instruction tuning on
# llava_v1_5_mix665k.json), 16 per GPU, 128 per step, --image_aspect_ratio pad --group_by_modality_length
# True; sets FINETUNE_ARGS, the stage-2 flags, on top of common.sh. Environment (defaults in brackets):
# PROJECTOR [./checkpoints/llava-v1.5-7b-clip-moe-pretrain/mm_projector.bin], DATA [./playground/data].
PER_GPU=16
GLOBAL=128
DATA=${DATA:-./playground/data}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

FINETUNE_ARGS=(
    --version v1
    --data_path "$DATA/llava_v1_5_mix665k.json"
    --image_folder "$DATA"
    --pretrain_mm_mlp_adapter "${PROJECTOR:-./checkpoints/llava-v1.5-7b-clip-moe-pretrain/mm_projector.bin}"
    --image_aspect_ratio pad
    --group_by_modality_length True
    --save_steps 50000
)
