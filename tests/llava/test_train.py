"""``python -m llava_patch.train`` end to end on CPU: DeepSpeed ZeRO-2/3, pretrain, finetune (full, LoRA, QLoRA).

The default suite runs one single-process ZeRO-3 fine-tune with a trainable CLIP-MoE tower; the other
recipes are ``slow``. DeepSpeed's CPU communication op is compiled once per environment (cached under
``<venv>/torch_extensions``).
"""

import json

import pytest
import torch
import transformers
from llava_runs import common_args, logged_losses, run_train, saved_checkpoint
from packaging import version
from safetensors.torch import load_file

import llava_patch
from mllm_encoder.checkpoint import read_checkpoint_tensors

TOWER = "model.vision_tower.vision_tower."
NEW_TRANSFORMERS = version.parse(transformers.__version__) >= version.parse("4.40")


@pytest.fixture(scope="module", autouse=True)
def patched():
    llava_patch.apply()


def tower_tensors(state_dict):
    return {name[len(TOWER) :]: tensor for name, tensor in state_dict.items() if name.startswith(TOWER)}


def assert_finite_losses(log, steps=2):
    losses = logged_losses(log)
    assert len(losses) >= steps and all(loss == loss and 0 < loss < 20 for loss in losses), losses
    assert "tokenization mismatch" not in log


def test_finetune_zero3_with_trainable_tower_saves_and_reloads(llava_workdir):
    from llava.model.builder import load_pretrained_model
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM

    output = llava_workdir / "llava-zero3-full"
    args = common_args(llava_workdir, output.name, "finetune", "zero3.json") + ["--unfreeze_mm_vision_tower", "True"]
    assert_finite_losses(run_train(llava_workdir, args))
    assert (saved_checkpoint(output) / "model.safetensors").exists()  # the scripts' save steps (issue 23)
    config = json.loads((output / "config.json").read_text())
    assert config["mm_vision_num_experts"] == 4 and "mm_vision_config" in config
    saved = tower_tensors(load_file(str(output / "model.safetensors")))
    source = read_checkpoint_tensors(llava_workdir / "clipmoe", "vision_model.")
    assert len(saved) == 39  # two of three layers (select_layer -2), no post_layernorm
    changed = [name for name, tensor in saved.items() if not torch.equal(tensor, source[name].half().float())]
    assert any(".mlp.router." in name for name in changed) and any(".mlp.experts." in name for name in changed)

    model = LlavaLlamaForCausalLM.from_pretrained(str(output), torch_dtype=torch.float32)
    restored = model.get_vision_tower().vision_tower.state_dict()
    assert restored.keys() == saved.keys()
    assert all(torch.equal(restored[name], saved[name]) for name in saved)  # bit-identical
    assert not any(p.requires_grad for p in model.get_vision_tower().parameters())

    tokenizer, model, processor, _ = load_pretrained_model(str(output), None, output.name, device="cpu")
    restored = model.get_vision_tower().vision_tower.state_dict()
    assert all(torch.equal(restored[name], saved[name].half()) for name in saved)
    prompt = tokenizer("USER: What color is the image? ASSISTANT:", return_tensors="pt").input_ids
    image = torch.zeros(1, 3, 32, 32, dtype=torch.float16)
    from llava.constants import IMAGE_TOKEN_INDEX

    input_ids = torch.cat([prompt[:, :3], torch.tensor([[IMAGE_TOKEN_INDEX]]), prompt[:, 3:]], dim=1)
    with torch.inference_mode():
        answer = model.generate(input_ids, images=image, do_sample=False, max_new_tokens=3)
    assert answer.shape[1] >= 3


@pytest.mark.slow
def test_saved_weights_are_the_trained_weights(llava_workdir):
    """With learning rate 0 the saved model must equal its sources exactly (no aliasing in the ZeRO-3 save)."""
    output = llava_workdir / "llava-zero3-lr0"
    args = common_args(llava_workdir, output.name, "finetune", "zero3.json")
    args += ["--unfreeze_mm_vision_tower", "True", "--learning_rate", "0", "--max_steps", "1"]
    run_train(llava_workdir, args)
    saved = load_file(str(output / "model.safetensors"))
    source = read_checkpoint_tensors(llava_workdir / "clipmoe", "vision_model.")
    for name, tensor in tower_tensors(saved).items():  # LLaVA casts the tower to fp16 first
        assert torch.equal(tensor, source[name].half().float()), name
    for name, tensor in load_file(str(llava_workdir / "llm" / "model.safetensors")).items():
        assert torch.equal(saved[name], tensor), name


@pytest.mark.slow
def test_pretrain_zero2_trains_only_the_projector(llava_workdir):
    output = llava_workdir / "llava-pretrain"
    assert_finite_losses(run_train(llava_workdir, common_args(llava_workdir, output.name, "pretrain", "zero2.json")))
    assert (saved_checkpoint(output) / "mm_projector.bin").exists()
    projector = torch.load(output / "mm_projector.bin", weights_only=True)
    assert sorted(projector) == [f"model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("bias", "weight")]
    assert json.loads((output / "config.json").read_text())["mm_vision_top_k"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("deepspeed", ["zero2.json", "zero3.json"])
def test_finetune_lora_and_reload_with_base(llava_workdir, deepspeed):
    from llava.model.builder import load_pretrained_model

    output = llava_workdir / f"llava-lora-{deepspeed[:5]}"
    args = common_args(llava_workdir, output.name, "finetune", deepspeed)
    args += ["--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16", "--mm_projector_lr", "2e-5"]
    assert_finite_losses(run_train(llava_workdir, args))
    assert (saved_checkpoint(output) / "adapter_model.safetensors").exists()
    assert (output / "adapter_model.safetensors").exists() and (output / "non_lora_trainables.bin").exists()
    assert "vision_tower" in json.loads((output / "adapter_config.json").read_text())["target_modules"]
    _, model, processor, _ = load_pretrained_model(str(output), str(llava_workdir / "llm"), output.name, device="cpu")
    source = read_checkpoint_tensors(llava_workdir / "clipmoe", "vision_model.")  # a frozen tower: from its checkpoint
    assert all(torch.equal(t, source[n].half()) for n, t in model.get_vision_tower().vision_tower.state_dict().items())
    assert processor is not None


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.skipif(not NEW_TRANSFORMERS, reason="transformers 4.37 / accelerate 0.34 run no DeepSpeed on CPU ranks")
@pytest.mark.parametrize("deepspeed", ["zero2.json", "zero3.json"])
def test_two_processes_with_different_routing(llava_workdir, deepspeed):
    """Two ranks see different images, so their MoE routing differs; stacked experts keep ZeRO-3 in step."""
    output = llava_workdir / f"llava-2proc-{deepspeed[:5]}"
    args = common_args(llava_workdir, output.name, "finetune", deepspeed)
    args += ["--unfreeze_mm_vision_tower", "True", "--use_cpu", "True"]
    assert_finite_losses(run_train(llava_workdir, args, nproc=2))
    assert tower_tensors(load_file(str(output / "model.safetensors")))


@pytest.mark.slow
@pytest.mark.skipif(not NEW_TRANSFORMERS, reason="quantised loading needs a GPU on transformers 4.37 (no CPU kernels)")
@pytest.mark.parametrize("bits", [4, 8])
def test_quantised_lora_zero2(llava_workdir, bits):
    output = llava_workdir / f"llava-qlora-{bits}bit"
    args = common_args(llava_workdir, output.name, "finetune", "zero2.json")
    args += [
        "--bits",
        str(bits),
        "--lora_enable",
        "True",
        "--lora_r",
        "8",
        "--lora_alpha",
        "16",
        "--mm_projector_lr",
        "2e-5",
    ]
    assert_finite_losses(run_train(llava_workdir, args))
    assert (saved_checkpoint(output) / "adapter_model.safetensors").exists()
    assert (output / "adapter_model.safetensors").exists()


def _repr_survives_partitioning() -> bool:
    from mllm_encoder.moe.experts import GroupedLinear

    layer = GroupedLinear(2, 3, 4)
    layer.weight.data = torch.empty(0)  # what ZeRO-3 leaves outside a gather
    try:
        repr(layer)
    except ValueError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _repr_survives_partitioning(), reason="GroupedLinear.extra_repr reads a partitioned shape")
def test_continue_from_llava_checkpoint_under_zero3(llava_workdir, tiny_llava_dir):
    """The tower is built inside ``zero.Init`` and its weights come from the LLaVA checkpoint."""
    output = llava_workdir / "llava-continued"
    args = common_args(llava_workdir, output.name, "finetune", "zero3.json")
    args[args.index("--model_name_or_path") + 1] = str(tiny_llava_dir)
    args += ["--unfreeze_mm_vision_tower", "True", "--learning_rate", "0", "--max_steps", "1"]
    run_train(llava_workdir, args)
    saved = load_file(str(output / "model.safetensors"))
    for name, tensor in load_file(str(tiny_llava_dir / "model.safetensors")).items():
        assert torch.equal(saved[name], tensor), name


@pytest.mark.slow
def test_siglip_moe_tower_pretrain_then_finetune_and_reload(llava_workdir):
    """LLaVA-1.5 with a SigLIP-MoE tower: stage 1 (projector), stage 2 with a trainable tower, exact reload."""
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM
    from tiny_models import build_tiny_siglip_moe

    build_tiny_siglip_moe(llava_workdir / "siglipmoe")
    pretrain = common_args(llava_workdir, "llava-siglip-pretrain", "pretrain", "zero2.json", tower="siglipmoe")
    assert_finite_losses(run_train(llava_workdir, pretrain))
    projector = llava_workdir / "llava-siglip-pretrain" / "mm_projector.bin"
    output = llava_workdir / "llava-siglip-finetune"
    finetune = common_args(llava_workdir, output.name, "finetune", "zero3.json", tower="siglipmoe")
    finetune += ["--unfreeze_mm_vision_tower", "True", "--pretrain_mm_mlp_adapter", str(projector)]
    assert_finite_losses(run_train(llava_workdir, finetune))
    saved = tower_tensors(load_file(str(output / "model.safetensors")))
    source = read_checkpoint_tensors(llava_workdir / "siglipmoe", "vision_model.")
    assert not any("class_embedding" in name or name.startswith("head.") for name in saved)  # SigLIP: neither
    changed = [name for name, tensor in saved.items() if not torch.equal(tensor, source[name].half().float())]
    assert any(".mlp.router." in name for name in changed)
    model = LlavaLlamaForCausalLM.from_pretrained(str(output), torch_dtype=torch.float32)
    restored = model.get_vision_tower().vision_tower.state_dict()
    assert restored.keys() == saved.keys()
    assert all(torch.equal(restored[name], saved[name]) for name in saved)  # bit-identical
