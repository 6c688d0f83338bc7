"""llava_patch.apply(): tower names, saved MoE settings, aux loss, loading, generation (in-process, no DeepSpeed)."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from llava_runs import REPO_ROOT
from packaging import version
from safetensors.torch import load_file, save_file

import llava_patch
from mllm_encoder.checkpoint import read_checkpoint_tensors
from mllm_encoder.cli import build_parser
from mllm_encoder.vision_tower import CLIPMoEVisionTower

TOWER = "model.vision_tower.vision_tower."


@pytest.fixture(scope="module", autouse=True)
def patched():
    llava_patch.apply()


def test_import_changes_nothing_apply_is_idempotent_and_undone():
    script = (
        "import llava_patch, llava.model.multimodal_encoder.builder as b, llava.model.llava_arch as a\n"
        "original = b.build_vision_tower\n"
        "assert a.build_vision_tower is original and original.__module__.startswith('llava.')\n"
        "llava_patch.apply(); llava_patch.apply()\n"
        "from llava_patch import patching\n"
        "assert b.build_vision_tower is a.build_vision_tower and b.build_vision_tower is not original\n"
        "assert patching.original_of(b.build_vision_tower) is original\n"
        "import llava.train.llava_trainer as lt, llava.train.train as t\n"
        "assert 'unfreeze_mm_vision_tower' in t.ModelArguments.__dataclass_fields__\n"
        "from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM as L\n"
        "assert '__init__' in vars(lt.LLaVATrainer) and 'from_pretrained' in vars(L)\n"
        "n = len(patching.patched_attributes()); llava_patch.apply(); assert len(patching.patched_attributes()) == n\n"
        "patching.undo_all()\n"
        "assert b.build_vision_tower is original and a.build_vision_tower is original\n"
        "assert 'unfreeze_mm_vision_tower' not in t.ModelArguments.__dataclass_fields__\n"
        "assert '__init__' not in vars(lt.LLaVATrainer) and 'from_pretrained' not in vars(L)\n"
        "import sys; assert t.transformers is sys.modules['transformers'] and patching.patched_attributes() == []\n"
        "llava_patch.apply(); assert patching.original_of(a.build_vision_tower) is original\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def _cfg(name, **extra):
    return SimpleNamespace(mm_vision_tower=name, mm_vision_select_layer=-2, mm_vision_select_feature="patch", **extra)


def test_tower_names(tiny_clip_moe_dir, tiny_hf_clip_dir, monkeypatch):
    from llava.model.multimodal_encoder.builder import build_vision_tower
    from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower

    monkeypatch.setenv("CLIP_MOE_PATH", str(tiny_clip_moe_dir))
    for name in ("clip-moe", f"clip-moe:{tiny_clip_moe_dir}", str(tiny_clip_moe_dir)):
        tower = build_vision_tower(_cfg(name))
        assert isinstance(tower, CLIPMoEVisionTower) and tower.config.num_experts == 4, name
        assert tower.source == str(tiny_clip_moe_dir)
    # A dense HF CLIP directory still goes to LLaVA's own tower; the prefix forces ours.
    assert type(build_vision_tower(_cfg(str(tiny_hf_clip_dir)))) is CLIPVisionTower
    assert isinstance(build_vision_tower(_cfg(f"clip-moe:{tiny_hf_clip_dir}")), CLIPMoEVisionTower)
    with pytest.raises(ValueError, match="Unknown vision tower"):
        build_vision_tower(_cfg("no-such-tower"))


def test_missing_default_checkpoint_explains_how_to_get_one(tmp_path, monkeypatch):
    from llava.model.multimodal_encoder.builder import build_vision_tower

    monkeypatch.setenv("CLIP_MOE_PATH", str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="CLIP_MOE_PATH.*clip-moe convert") as error:
        build_vision_tower(_cfg("clip-moe"))
    suggested = re.search(r"`clip-moe (convert [^`]+)`", str(error.value)).group(1)
    args = build_parser().parse_args(shlex.split(suggested))  # the suggested command parses (issue 23: no --out)
    assert args.out == tmp_path / "absent" and args.source_format == "official-clip-moe"
    with pytest.raises(ValueError, match="not a directory"):
        build_vision_tower(_cfg(f"clip-moe:{tmp_path / 'absent'}"))


def test_moe_settings_saved_in_llava_config(tiny_llava_dir):
    config = json.loads((tiny_llava_dir / "config.json").read_text())
    assert config["mm_vision_tower"].startswith("clip-moe:")
    assert config["mm_vision_num_experts"] == 4 and config["mm_vision_top_k"] == 2
    assert config["mm_vision_router_aux_loss_coef"] == pytest.approx(0.01)
    assert config["mm_vision_config"]["num_hidden_layers"] == 3
    assert config["mm_vision_image_processor"]["crop_size"] == {"height": 32, "width": 32}
    assert config["mm_hidden_size"] == 32


def _batch(tokenizer, image_processor, model_config):
    from llava.mm_utils import process_images, tokenizer_image_token
    from PIL import Image

    image = Image.new("RGB", (40, 32), (200, 20, 20))
    prompt = "USER: <image>\nWhat color is the image? ASSISTANT: It is red."
    input_ids = tokenizer_image_token(prompt, tokenizer, return_tensors="pt").unsqueeze(0)
    return input_ids, process_images([image], image_processor, model_config), image.size


def test_trainable_tower_adds_weighted_aux_loss(tiny_llava_dir):
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM
    from transformers import AutoTokenizer

    model = LlavaLlamaForCausalLM.from_pretrained(str(tiny_llava_dir), torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llava_dir), use_fast=False)
    tower = model.get_vision_tower()
    input_ids, images, _ = _batch(tokenizer, tower.image_processor, model.config)
    frozen = model(input_ids=input_ids, labels=input_ids, images=images).loss
    tower.requires_grad_(True)
    trained = model(input_ids=input_ids, labels=input_ids, images=images).loss
    aux = tower.vision_tower(images, output_hidden_states=True).aux_loss
    assert aux > 0
    torch.testing.assert_close(trained - frozen, 0.01 * aux, rtol=1e-4, atol=1e-6)
    trained.backward()
    assert tower.vision_tower.vision_model.encoder.layers[0].mlp.router.weight.grad.abs().sum() > 0


def test_load_pretrained_model_keeps_tower_weights_and_generates(tiny_llava_dir):
    from llava.model.builder import load_pretrained_model

    tokenizer, model, image_processor, _ = load_pretrained_model(
        str(tiny_llava_dir), None, tiny_llava_dir.name, device="cpu"
    )
    tower = model.get_vision_tower()
    assert isinstance(tower, CLIPMoEVisionTower) and image_processor is tower.image_processor
    stored = load_file(str(tiny_llava_dir / "model.safetensors"))
    for name, tensor in tower.vision_tower.state_dict().items():
        assert torch.equal(tensor, stored[TOWER + name].to(tensor.dtype)), name
    input_ids, images, size = _batch(tokenizer, image_processor, model.config)
    input_ids = input_ids[:, : input_ids.shape[1] - 4]  # stop at "ASSISTANT:"
    with torch.inference_mode():
        output = model.generate(input_ids, images=images.half(), image_sizes=[size], do_sample=False, max_new_tokens=4)
    # Only new tokens come back (transformers 4.37 puts a BOS in front of them).
    assert output.shape[0] == 1 and output.shape[1] in (4, 5)
    assert 0 <= int(output.min()) and int(output.max()) < len(tokenizer)
    assert isinstance(tokenizer.decode(output[0], skip_special_tokens=True), str)


def test_load_pretrained_model_without_llava_in_name_returns_image_processor(tiny_llava_dir, tmp_path):
    from llava.model.builder import load_pretrained_model

    renamed = tmp_path / "my-model"
    renamed.symlink_to(tiny_llava_dir, target_is_directory=True)
    _, model, image_processor, _ = load_pretrained_model(str(renamed), None, "my-model", device="cpu")
    assert image_processor is model.get_vision_tower().image_processor


def test_checkpoint_without_tower_weights_loads_them_from_clip_moe_dir(tiny_llava_dir, tmp_path):
    from llava.model.builder import load_pretrained_model

    stripped = tmp_path / "llava-stripped"
    stripped.mkdir()
    for file in tiny_llava_dir.iterdir():
        if file.name != "model.safetensors":
            (stripped / file.name).write_bytes(file.read_bytes())
    weights = load_file(str(tiny_llava_dir / "model.safetensors"))
    without_tower = {name: tensor for name, tensor in weights.items() if TOWER not in name}
    save_file(without_tower, str(stripped / "model.safetensors"), {"format": "pt"})
    _, model, _, _ = load_pretrained_model(str(stripped), None, stripped.name, device="cpu")
    source = read_checkpoint_tensors(Path(model.get_vision_tower().source), "vision_model.")
    for name, tensor in model.get_vision_tower().vision_tower.state_dict().items():
        assert torch.equal(tensor, source[name].to(tensor.dtype)), name


@pytest.mark.skipif(
    version.parse(transformers.__version__) < version.parse("4.40"),
    reason="bitsandbytes quantised loading needs a GPU on transformers 4.37 (no CPU kernels)",
)
@pytest.mark.parametrize("bits", [4, 8])
def test_quantised_load_keeps_tower_unquantised(tiny_llava_dir, bits):
    import bitsandbytes as bnb
    from llava.model.builder import load_pretrained_model

    flag = {4: "load_4bit", 8: "load_8bit"}[bits]
    _, model, _, _ = load_pretrained_model(str(tiny_llava_dir), None, tiny_llava_dir.name, device="cpu", **{flag: True})
    quantised = [n for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]
    assert len(quantised) == 14  # 7 linear layers in each of the 2 Llama layers
    assert not any("vision_tower" in name or "mm_projector" in name or "lm_head" in name for name in quantised)
    tower = model.get_vision_tower()
    assert tower.dtype == torch.float16
    with torch.inference_mode():
        output = model.generate(
            torch.tensor([[1, 50, 60, -200, 70]]), images=torch.zeros(1, 3, 32, 32, dtype=torch.float16),
            max_new_tokens=2, do_sample=False,
        )  # fmt: skip
    assert output.shape[1] >= 2


def test_lora_targets_only_the_language_model(tiny_llava_dir):
    import re

    import llava.train.train as llava_train
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM

    model = LlavaLlamaForCausalLM.from_pretrained(str(tiny_llava_dir))
    pattern = llava_train.find_all_linear_names(model)
    linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    targeted = [name for name in linear if re.fullmatch(pattern, name)]
    assert len(targeted) == 14 and all(name.startswith("model.layers.") for name in targeted)
    assert any("vision_tower" in name and name.endswith("q_proj") for name in linear)


def _checkpoint_with_code(root: Path, name: str):
    """A model folder whose ``configuration_mpt.py`` leaves a marker file when it runs."""
    model_dir, marker = root / name, root / "code-ran"
    model_dir.mkdir()
    config = {"model_type": "evil_mpt", "auto_map": {"AutoConfig": "configuration_mpt.EvilConfig"}}
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "configuration_mpt.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "raise RuntimeError('code of the checkpoint folder ran')\n"
    )
    return model_dir, marker


def test_llava_loaders_run_no_checkpoint_code_unless_trusted(llava_workdir, tmp_path, monkeypatch):
    import llava.train.train as llava_train
    import transformers.dynamic_module_utils as dynamic_modules
    from llava.model.builder import load_pretrained_model

    monkeypatch.setattr(dynamic_modules, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    model_dir, marker = _checkpoint_with_code(tmp_path, "llava-mpt-projector")
    base = str(llava_workdir / "llm")
    # LLaVA's builder passes trust_remote_code=True for 'mpt' names (projector-only checkpoint + base LLM).
    with pytest.raises(ValueError, match="run Python code from the checkpoint folder; pass --trust-remote-code"):
        load_pretrained_model(str(model_dir), base, model_dir.name, device="cpu")
    with pytest.raises(ValueError, match="--trust-remote-code"):  # LLaVA's training script, 'mpt' base model
        llava_train.transformers.AutoConfig.from_pretrained(str(model_dir), trust_remote_code=True)
    assert not marker.exists()
    with pytest.raises(RuntimeError, match="code of the checkpoint folder ran"):  # allowed: it runs
        load_pretrained_model(str(model_dir), base, model_dir.name, device="cpu", trust_remote_code=True)
    assert marker.read_text() == "ran"


def test_entry_points_take_the_trust_flag_and_name_a_missing_model_dir(tmp_path):
    from llava.model.builder import load_pretrained_model

    from llava_patch.tower.loading import pop_trust_remote_code_flag

    argv = ["--model-path", "m", "--trust-remote-code", "--temperature", "0"]
    assert pop_trust_remote_code_flag(argv) == (["--model-path", "m", "--temperature", "0"], True)
    assert pop_trust_remote_code_flag(["--model-path", "m"]) == (["--model-path", "m"], False)
    missing = tmp_path / "checkpoints" / "llava-v1.5-7b"
    with pytest.raises(ValueError, match=f"{missing}: no such model directory \\(--model-path\\)"):
        load_pretrained_model(str(missing), None, "llava-v1.5-7b", device="cpu")
