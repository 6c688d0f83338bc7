"""Fixtures of the experiment tests: the processors of the shared tiny dense base (``tiny_base_dir``)."""

import pytest

from mllm_encoder.checkpoint import load_processors


@pytest.fixture(scope="session")
def image_processor(tiny_base_dir):
    return load_processors(tiny_base_dir)[0]


@pytest.fixture(scope="session")
def clip_tokenizer(tiny_base_dir):
    return load_processors(tiny_base_dir)[1]
