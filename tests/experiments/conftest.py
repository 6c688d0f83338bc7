"""Fixtures of the experiment tests: a saved tiny dense base with the real CLIP tokenizer, and its processors."""

import pytest
from tiny_models import write_tiny_clip_base

from mllm_encoder.checkpoint import load_processors


@pytest.fixture(scope="session")
def experiments_tokenizer_dir(tmp_path_factory):
    from mllm_encoder.conversion.tokenizer import write_clip_tokenizer

    path = tmp_path_factory.mktemp("experiments_tokenizer")
    write_clip_tokenizer(path, context_length=32)
    return path


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory, experiments_tokenizer_dir):
    return write_tiny_clip_base(tmp_path_factory.mktemp("experiments_base") / "base", experiments_tokenizer_dir)


@pytest.fixture(scope="session")
def image_processor(tiny_base_dir):
    return load_processors(tiny_base_dir)[0]


@pytest.fixture(scope="session")
def clip_tokenizer(tiny_base_dir):
    return load_processors(tiny_base_dir)[1]
