"""DeepSpeed configs and ``scripts/llava/*.sh``: LLaVA-1.5 recipes whose flags LLaVA's argument parser knows."""

import dataclasses
import json
import os
import stat
import subprocess

import pytest
from llava_runs import REPO_ROOT

import llava_patch

SCRIPTS = REPO_ROOT / "scripts" / "llava"


@pytest.mark.parametrize("name, stage", [("zero2.json", 2), ("zero3.json", 3), ("zero3_offload.json", 3)])
def test_deepspeed_configs(name, stage):
    config = json.loads((REPO_ROOT / "scripts" / name).read_text())
    zero = config["zero_optimization"]
    assert zero["stage"] == stage and zero["overlap_comm"] and zero["contiguous_gradients"]
    assert config["bf16"]["enabled"] == config["fp16"]["enabled"] == "auto"
    assert config["train_micro_batch_size_per_gpu"] == config["gradient_accumulation_steps"] == "auto"
    if stage == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    if name == "zero3_offload.json":
        assert zero["offload_param"]["device"] == zero["offload_optimizer"]["device"] == "cpu"


def _launch(script, tmp_path, num_gpus):
    """Run ``script`` with a stand-in ``deepspeed`` that records its arguments."""
    stub = tmp_path / "deepspeed"
    stub.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$ARGS_FILE"\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    args_file = tmp_path / f"{script}.args"
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}", ARGS_FILE=str(args_file),
               NUM_GPUS=str(num_gpus))  # fmt: skip
    subprocess.run(["bash", str(SCRIPTS / script)], env=env, check=True)
    return args_file.read_text().splitlines()


def _values(args):
    values, key = {}, None
    for arg in args:
        if arg.startswith("--"):
            key = arg[2:]
            values[key] = None
        elif key is not None and values[key] is None:
            values[key] = arg
    return values


@pytest.mark.parametrize(
    "script, stage, per_gpu, lr",
    [
        ("pretrain.sh", 2, 32, "1e-3"),
        ("finetune.sh", 3, 16, "2e-5"),
        ("finetune_lora.sh", 3, 16, "2e-4"),
        ("finetune_qlora.sh", 2, 16, "2e-4"),
    ],
)
def test_scripts_follow_llava_recipes(script, stage, per_gpu, lr, tmp_path):
    llava_patch.apply()
    import llava.train.train as llava_train

    from llava_patch.compat.trainer import translate_arguments

    args = _launch(script, tmp_path, num_gpus=8)
    assert args[:4] == ["--num_gpus", "8", "--module", "llava_patch.train"]
    assert "--warmup_ratio" in args
    values = _values(translate_arguments(args[4:]))
    fields = {f.name for cls in (llava_train.ModelArguments, llava_train.DataArguments, llava_train.TrainingArguments)
              for f in dataclasses.fields(cls)}  # fmt: skip
    assert set(values) <= fields, set(values) - fields
    assert values["vision_tower"] == "clip-moe" and values["mm_vision_select_layer"] == "-2"
    assert values["deepspeed"].endswith(f"zero{stage}.json") and values["learning_rate"] == lr
    assert int(values["per_device_train_batch_size"]) == per_gpu and values["gradient_accumulation_steps"] == "1"
    if script != "pretrain.sh":
        assert values["image_aspect_ratio"] == "pad" and values["group_by_modality_length"] == "True"
    if "lora" in script:
        assert (values["lora_r"], values["lora_alpha"], values["mm_projector_lr"]) == ("128", "256", "2e-5")
        assert values.get("bits") == ("4" if "qlora" in script else None)
    # Fewer GPUs keep the global batch (256 / 128) through gradient accumulation.
    fewer = _values(_launch(script, tmp_path, num_gpus=2)[4:])
    global_batch = 256 if script == "pretrain.sh" else 128
    assert int(fewer["gradient_accumulation_steps"]) * 2 * per_gpu == global_batch


def test_renamed_training_arguments_are_translated():
    from transformers import TrainingArguments

    from llava_patch.compat.trainer import translate_arguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    args = translate_arguments(["--warmup_ratio", "0.03", "--evaluation_strategy=no", "--bf16", "True"])
    assert args[1] == "0.03" and args[3:] == ["--bf16", "True"]
    assert args[0][2:] in fields and args[2].split("=")[0][2:] in fields and args[2].endswith("=no")
