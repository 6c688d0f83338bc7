# Sourced (not run) by scripts/llava/*.sh: environment defaults, the LLaVA-1.5 training flags every stage
# shares (LLAVA_ARGS) and train_llava, which launches llava_patch.train under DeepSpeed with them.
# The sourcing script sets PER_GPU and GLOBAL first (images per GPU and per optimizer step; gradient
# accumulation keeps GLOBAL on fewer GPUs). Environment (defaults in brackets): NUM_GPUS [8],
# LLM [lmsys/vicuna-7b-v1.5], VISION_TOWER [clip-moe], ATTN [sdpa], REPORT_TO [none].
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
NUM_GPUS=${NUM_GPUS:-8}
export LLAVA_ATTN_IMPLEMENTATION=${ATTN:-sdpa}
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

LLAVA_ARGS=(
    --model_name_or_path "${LLM:-lmsys/vicuna-7b-v1.5}"
    --vision_tower "${VISION_TOWER:-clip-moe}"
    --mm_projector_type mlp2x_gelu
    --mm_vision_select_layer -2
    --mm_use_im_start_end False
    --mm_use_im_patch_token False
    --bf16 True
    --num_train_epochs 1
    --per_device_train_batch_size "$PER_GPU"
    --gradient_accumulation_steps $((GLOBAL / (NUM_GPUS * PER_GPU)))
    --save_strategy steps
    --save_total_limit 1
    --weight_decay 0.
    --warmup_ratio 0.03
    --lr_scheduler_type cosine
    --logging_steps 1
    --tf32 True
    --model_max_length 2048
    --gradient_checkpointing True
    --dataloader_num_workers 4
    --lazy_preprocess True
    --report_to "${REPORT_TO:-none}"
)

# train_llava ARGS...: the DeepSpeed launch with LLAVA_ARGS, then ARGS (later flags win).
train_llava() {
    deepspeed --num_gpus "$NUM_GPUS" --module llava_patch.train "${LLAVA_ARGS[@]}" "$@"
}
