# Sourced (not run) by scripts/eval/*.sh after they set MODEL_PATH and DATA: LLaVA-1.5's sharded answering.
# Sets CLIP_MOE (the command, default clip-moe) and CKPT (the checkpoint's name); answers go under
# $DATA/answers/$CKPT/, the merged file is $DATA/answers/$CKPT.jsonl. GPUs: CUDA_VISIBLE_DEVICES (default 0);
# ANSWER_ARGS: extra `clip-moe eval answer` flags.
CLIP_MOE=${CLIP_MOE:-clip-moe}
CKPT=$(basename "$MODEL_PATH")

# answer_sharded QUESTION_FILE IMAGE_FOLDER: one resumable `eval answer` shard per GPU (temperature 0,
# vicuna_v1), wait for all, then merge the shards in question order.
answer_sharded() {
    local question_file=$1 image_folder=$2 gpus shards=() pids=() idx pid shard
    IFS=',' read -ra gpus <<< "${CUDA_VISIBLE_DEVICES:-0}"
    local chunks=${#gpus[@]}
    for idx in $(seq 0 $((chunks - 1))); do
        shard="$DATA/answers/$CKPT/${chunks}_${idx}.jsonl"
        shards+=("$shard")
        CUDA_VISIBLE_DEVICES=${gpus[$idx]} $CLIP_MOE eval answer \
            --model-path "$MODEL_PATH" \
            --question-file "$question_file" \
            --image-folder "$image_folder" \
            --answers-file "$shard" \
            --num-chunks "$chunks" \
            --chunk-idx "$idx" \
            --temperature 0 \
            --conv-mode vicuna_v1 \
            ${ANSWER_ARGS:-} &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do
        wait "$pid"
    done

    $CLIP_MOE eval merge \
        --question-file "$question_file" \
        --output "$DATA/answers/$CKPT.jsonl" \
        "${shards[@]}"
}
