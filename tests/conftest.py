"""Shared fixtures: tiny CLIP / CLIP-MoE configurations and checkpoints (no network)."""

import pathlib
import sys

import pytest
import torch
from tiny_models import tiny_clip_moe_config, tiny_text_config, tiny_vision_config, write_tiny_clip_base


@pytest.fixture(scope="session")
def clip_tokenizer_dir(tmp_path_factory) -> pathlib.Path:
    """The real OpenAI CLIP tokenizer, context 16, written from open_clip's bundled vocabulary."""
    from mllm_encoder.conversion.tokenizer import write_clip_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    write_clip_tokenizer(path, context_length=16)
    return path


@pytest.fixture(scope="session")
def dmu_tokenizer_dir(tmp_path_factory) -> pathlib.Path:
    """The real CLIP tokenizer at context 32 (the DMU and experiment tests' base)."""
    from mllm_encoder.conversion.tokenizer import write_clip_tokenizer

    path = tmp_path_factory.mktemp("dmu_tokenizer")
    write_clip_tokenizer(path, context_length=32)
    return path


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory, dmu_tokenizer_dir) -> pathlib.Path:
    """A saved dense tiny CLIP-MoE base (2 layers per tower) with that tokenizer."""
    return write_tiny_clip_base(tmp_path_factory.mktemp("dmu_base") / "base", dmu_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_clip_moe_dir(tmp_path_factory, clip_tokenizer_dir) -> pathlib.Path:
    """A saved tiny CLIP-MoE (4 experts, top-2) with image processor and tokenizer."""
    from transformers import AutoTokenizer

    from mllm_encoder import CLIPMoEModel
    from mllm_encoder.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = CLIPMoEModel(tiny_clip_moe_config())
    path = tmp_path_factory.mktemp("clip_moe") / "tiny-clip-moe"
    save_checkpoint(model, path, tokenizer=AutoTokenizer.from_pretrained(clip_tokenizer_dir))
    return path


@pytest.fixture(scope="session")
def tiny_hf_clip_dir(tmp_path_factory, clip_tokenizer_dir) -> pathlib.Path:
    """A saved tiny dense HF ``CLIPModel`` (random weights) with image processor and tokenizer."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    from mllm_encoder.checkpoint import default_image_processor

    torch.manual_seed(1)
    config = CLIPConfig(vision_config=tiny_vision_config(), text_config=tiny_text_config(), projection_dim=16)
    model = CLIPModel(config)
    path = tmp_path_factory.mktemp("hf_clip") / "tiny-clip"
    model.save_pretrained(path)
    default_image_processor(32).save_pretrained(path)
    AutoTokenizer.from_pretrained(clip_tokenizer_dir).save_pretrained(path)
    return path


def pytest_terminal_summary(terminalreporter):
    """The docs check's count (tests/test_docs.py): blocks run, blocks marked not runnable, blocks not code."""
    summary = getattr(sys.modules.get("test_docs"), "SUMMARY", None)
    if summary and (summary["ran"] or summary["marked"]):
        terminalreporter.write_line(
            f"docs check: {len(summary['ran'])} blocks ran, {len(summary['marked'])} marked not runnable, "
            f"{len(summary['text'])} not code (text)"
        )
        for marked in summary["marked"]:
            terminalreporter.write_line(f"  marked: {marked}")
