"""Fixtures for the LLaVA tests: tiny LLM, tiny CLIP-MoE, synthetic conversations, a tiny LLaVA."""

from pathlib import Path

import llava_fixtures
import pytest
import tiny_models


@pytest.fixture(scope="session")
def llava_workdir(tmp_path_factory) -> Path:
    """A directory with ``llm/`` (tiny Llama), ``clipmoe/`` (tiny CLIP-MoE) and ``data/`` (both data sets)."""
    root = tmp_path_factory.mktemp("llava")
    llava_fixtures.build_tiny_llama(root / "llm")
    tiny_models.build_tiny_clip_moe(root / "clipmoe")
    llava_fixtures.write_synthetic_conversations(root / "data", plain=True)
    llava_fixtures.write_synthetic_conversations(root / "data")
    return root


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory) -> Path:
    """A complete random LLaVA checkpoint with a CLIP-MoE tower (``llava_fixtures.build_tiny_llava``)."""
    return llava_fixtures.build_tiny_llava(tmp_path_factory.mktemp("tiny_llava") / "llava-tiny-clip-moe")
