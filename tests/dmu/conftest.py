"""Fixtures of the DMU tests."""

import pytest
from dmu_helpers import TensorPairs
from tiny_models import write_tiny_clip_base


@pytest.fixture
def pairs():
    return TensorPairs()


@pytest.fixture(scope="session")
def dmu_tokenizer_dir(tmp_path_factory):
    from mllm_encoder.conversion.tokenizer import write_clip_tokenizer

    path = tmp_path_factory.mktemp("dmu_tokenizer")
    write_clip_tokenizer(path, context_length=32)
    return path


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory, dmu_tokenizer_dir):
    return write_tiny_clip_base(tmp_path_factory.mktemp("dmu_base") / "base", dmu_tokenizer_dir)


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory):
    from mllm_encoder.data.synthetic import write_shapes_dataset

    return write_shapes_dataset(
        tmp_path_factory.mktemp("shapes"), num_train=40, num_eval=16, image_size=32, progress=False
    )
