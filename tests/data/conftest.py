"""Fixtures for the data tests: a real CLIP BPE tokenizer, an image processor and tiny datasets on disk."""

import numpy as np
import pytest
from data_helpers import IMAGE_SIZE, random_image, write_test_clip_tokenizer


@pytest.fixture(scope="session")
def clip_tokenizer(tmp_path_factory):
    """A real CLIP tokenizer (model_max_length 77)."""
    from transformers import CLIPTokenizer

    path = write_test_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    return CLIPTokenizer.from_pretrained(str(path), model_max_length=77)


@pytest.fixture(scope="session")
def image_processor():
    """A slow (PIL) CLIPImageProcessor producing 32x32 crops."""
    from transformers import CLIPImageProcessor

    try:
        from transformers import CLIPImageProcessorPil as processor_class
    except ImportError:
        processor_class = CLIPImageProcessor
    return processor_class(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


@pytest.fixture
def image_files(tmp_path):
    """Five small JPEGs ``img0.jpg`` .. ``img4.jpg`` and their captions."""
    rng = np.random.default_rng(0)
    captions = [f"a photo of object number {i}" for i in range(5)]
    for i in range(5):
        random_image(rng, 40 + 3 * i, 36).save(tmp_path / f"img{i}.jpg")
    return tmp_path, captions
