"""What every DMU stage loads and saves: models, processors, the training data, checkpoints.

Read once per process where it is safe to share: the processors (the fast tokenizer's JSON takes most of a
second) and the training set (e.g. a tar-shard index) are cached by directory; models are loaded fresh.
"""

import functools
from pathlib import Path

import torch

from mllm_encoder.atomic import PathLike
from mllm_encoder.checkpoint import load_processors, save_checkpoint
from mllm_encoder.data import ImageTextCollator, load_image_text_dataset
from mllm_encoder.dmu.config import DataSection
from mllm_encoder.loading import load_clip_moe


def load_model(model_dir: PathLike) -> torch.nn.Module:
    """A two-tower model from a CLIP-MoE (dense or MoE) or Hugging Face CLIP directory, in float32."""
    model = load_clip_moe(str(model_dir)).float()
    if not hasattr(model, "text_model") or not hasattr(model, "vision_model"):
        raise ValueError(f"{model_dir}: DMU needs both towers (a CLIP / CLIP-MoE model, not a single tower)")
    return model


@functools.lru_cache(maxsize=8)
def _cached_processors(directory: str):
    return load_processors(directory)


def processors(directory: PathLike):
    """The image processor and tokenizer of a checkpoint directory (read once per process: loading the
    fast tokenizer's JSON takes most of a second, and every stage of a run shares the base's)."""
    return _cached_processors(str(Path(directory).resolve()))


@functools.lru_cache(maxsize=4)
def _cached_dataset(data: DataSection, processors_dir: str):
    image_processor, tokenizer = processors(processors_dir)
    if tokenizer is None:
        raise ValueError(f"{processors_dir}: the checkpoint has no tokenizer files, needed to encode captions")
    return load_image_text_dataset(
        data.train,
        format=data.format,
        image_root=data.image_root,
        image_processor=image_processor,
        tokenizer=tokenizer,
        random_access=True,
        allow_absolute_paths=data.allow_absolute_paths,
    )


def load_training_data(data: DataSection, processors_dir: PathLike):
    """``(dataset, collator)`` of ``data`` with the processors of ``processors_dir``.

    The dataset is built once per process and shared by every stage that reads it with the same processors
    (e.g. a tar-shard index is read once); each call gets a fresh collator, so bad samples count per stage.
    """
    dataset = _cached_dataset(data, str(Path(processors_dir).resolve()))
    return dataset, ImageTextCollator(max_bad_fraction=data.max_bad_fraction, dataset=dataset)


def save_model(model: torch.nn.Module, out_dir: PathLike, processors_dir: PathLike) -> Path:
    """A complete checkpoint directory with the image processor and tokenizer of ``processors_dir``."""
    image_processor, tokenizer = processors(processors_dir)
    return save_checkpoint(model, out_dir, image_processor=image_processor, tokenizer=tokenizer, overwrite=True)
