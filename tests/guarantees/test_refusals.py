"""Issue 20: refusals read as refusals (one line naming the file or field and the fix; "internal error" only for
bugs), and hostile data is refused: NaN weights, pickles in checkpoint folders, symbolic links out of the image
root, a bad ``mm_vision_config`` field."""

import os
import pickle
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import ReferenceOpenAICLIPMoE, tiny_vision_config

from mllm_encoder.cli import error_line, main
from mllm_encoder.locking import LockError, directory_lock


def _run_cli(capsys, *argv):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in argv])
    return exit_info.value.code, capsys.readouterr().err


def test_a_lock_refusal_is_not_an_internal_error(tmp_path):
    with directory_lock(tmp_path):
        with pytest.raises(LockError) as refused:
            directory_lock(tmp_path).acquire()
    line = error_line(refused.value)
    assert line.startswith(f"run directory {tmp_path} is in use by pid {os.getpid()}") and "internal error" not in line
    assert error_line(KeyError("x")).startswith("internal error (KeyError")


class _Payload:
    def __reduce__(self):  # a harmless call; weights_only loading must refuse it without calling it
        return (os.path.join, ("payload", "ran"))


def test_a_pickle_payload_inside_a_checkpoint_folder_is_named(tiny_hf_clip_dir, tmp_path, capsys):
    from mllm_encoder.loading import load_clip_moe

    folder = tmp_path / "model"
    folder.mkdir()
    for entry in tiny_hf_clip_dir.iterdir():
        if entry.name != "model.safetensors":
            (folder / entry.name).write_bytes(entry.read_bytes())
    state = load_file(str(tiny_hf_clip_dir / "model.safetensors"))
    torch.save({**state, "extra": _Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=rf"{folder / 'pytorch_model.bin'}: corrupt, unreadable or not a weights-only"):
        load_clip_moe(folder)
    code, err = _run_cli(capsys, "inspect", folder)
    assert code == 1 and "pytorch_model.bin" in err and "internal error" not in err


def test_truncated_llava_weights_are_named_before_llava_loads_them(tmp_path):
    pytest.importorskip("llava")
    from llava_patch.tower.loading import _wrap

    checkpoint = tmp_path / "llava-tiny"
    checkpoint.mkdir()
    save_file({"w": torch.zeros(64, 64)}, str(checkpoint / "model.safetensors"))
    data = (checkpoint / "model.safetensors").read_bytes()
    (checkpoint / "model.safetensors").write_bytes(data[: len(data) // 2])
    calls = []
    with pytest.raises(ValueError, match=rf"{checkpoint / 'model.safetensors'}: corrupt or unreadable weights file"):
        _wrap(lambda *args, **kwargs: calls.append(args))(str(checkpoint), None, "llava-tiny")
    assert not calls


def test_a_state_dict_missing_a_tensor_is_named_with_the_file(tmp_path, capsys):
    state = ReferenceOpenAICLIPMoE(num_experts=0, moe_last=0, long_clip=False).state_dict()
    del state["transformer.resblocks.0.mlp.c_fc.weight"]
    torch.save(state, tmp_path / "clip.pt")
    code, err = _run_cli(capsys, "convert", tmp_path / "clip.pt", tmp_path / "out", "--from", "openai")
    assert code == 1 and f"{tmp_path / 'clip.pt'}: the state dict lacks the tensor" in err
    assert "transformer.resblocks.0.mlp.c_fc.weight" in err and not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_a_refusal(tmp_path, capsys):
    argv = ["eval", "retrieval", "--model", tmp_path, "--data", tmp_path, "--device", "cuda"]
    code, err = _run_cli(capsys, *argv)
    assert code == 1 and "--device cuda: torch" in err and "finds no CUDA GPU here; use --device cpu" in err


def test_nan_weights_are_never_written(tiny_hf_clip_dir, tmp_path, capsys):
    source = tmp_path / "nan-clip"
    source.mkdir()
    for entry in tiny_hf_clip_dir.iterdir():
        (source / entry.name).write_bytes(entry.read_bytes())
    state = load_file(str(source / "model.safetensors"))
    name = sorted(key for key in state if key.endswith("fc1.weight"))[0]
    state[name][0, 0] = float("nan")
    save_file(state, str(source / "model.safetensors"), metadata={"format": "pt"})
    code, err = _run_cli(capsys, "upcycle", source, tmp_path / "out", "--num-experts", "2")
    assert code == 1 and f"{source}: tensor {name} holds NaN or infinite values" in err
    assert not (tmp_path / "out").exists()


def test_symbolic_links_out_of_the_image_root_are_refused(tmp_path):
    from mllm_encoder.data.records import resolve_image_path

    root = tmp_path / "images"
    (root / "inside").mkdir(parents=True)
    secret = tmp_path / "secret.txt"
    secret.write_text("not an image")
    (root / "escape.jpg").symlink_to(secret)
    (root / "linked").symlink_to(tmp_path)
    (root / "alias.jpg").symlink_to(root / "inside")
    for image in ("escape.jpg", "linked/secret.txt"):
        with pytest.raises(ValueError, match=rf"rec 1: image path '{image}' is a symbolic link .* outside the image"):
            resolve_image_path(image, root, "rec 1")
        assert resolve_image_path(image, root, "rec 1", allow_absolute=True) == str(root / image)
    assert resolve_image_path("alias.jpg", root, "rec 1") == str(root / "alias.jpg")  # a link within the root


def test_a_bad_mm_vision_config_field_names_the_file_and_field(tmp_path):
    from mllm_encoder.vision_tower import CLIPMoEVisionTower

    config = {"model_type": "clip_moe_vision_model", **tiny_vision_config(), "num_hidden_layers": -1}
    args = SimpleNamespace(mm_vision_select_layer=-2, mm_vision_config=config, _name_or_path=str(tmp_path / "llava"))
    with pytest.raises(
        ValueError, match=rf"{tmp_path / 'llava' / 'config.json'}: mm_vision_config: .*num_hidden_layers"
    ):
        CLIPMoEVisionTower("clip-moe", args=args, delay_load=True)


def test_pickle_loads_of_the_probe_payload_would_have_run_code():
    """The payload above is a real one: plain ``pickle`` calls it (so the refusals above are meaningful)."""
    assert pickle.loads(pickle.dumps(_Payload())) == os.path.join("payload", "ran")
