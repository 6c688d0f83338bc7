"""Fixtures of the DMU tests."""

import pytest
from dmu_helpers import TensorPairs


@pytest.fixture
def pairs():
    return TensorPairs()


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory):
    from mllm_encoder.data.synthetic import write_shapes_dataset

    return write_shapes_dataset(
        tmp_path_factory.mktemp("shapes"), num_train=40, num_eval=16, image_size=32, progress=False
    )
