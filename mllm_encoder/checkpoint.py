"""Complete, offline-loadable checkpoint directories: weights, config, image processor, tokenizer.

See ``docs/checkpoints.md`` for the format.
"""

import json
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
from safetensors import safe_open
from transformers import AutoTokenizer, CLIPImageProcessor, PreTrainedModel

from mllm_encoder.atomic import atomic_directory

logger = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def default_image_processor(image_size: int) -> CLIPImageProcessor:
    """OpenAI CLIP preprocessing for ``image_size``: bicubic shortest-side resize, centre crop, normalise."""
    return CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )


def _vision_image_size(model: PreTrainedModel) -> int:
    config = getattr(model.config, "vision_config", model.config)
    return config.image_size


def save_checkpoint(
    model: PreTrainedModel,
    out_dir: Union[str, os.PathLike],
    image_processor: Optional[CLIPImageProcessor] = None,
    tokenizer=None,
    max_shard_size: str = "5GB",
) -> Path:
    """Write ``model`` as a complete checkpoint directory, atomically.

    Writes ``config.json``, ``model.safetensors`` (sharded above ``max_shard_size``),
    ``preprocessor_config.json`` (``image_processor`` or OpenAI CLIP's for the model's image size) and, when
    given, the tokenizer files. A model with a text tower saved without a tokenizer logs a warning.
    """
    out_dir = Path(out_dir)
    processor = image_processor or default_image_processor(_vision_image_size(model))
    with atomic_directory(out_dir) as staging:
        model.save_pretrained(staging, safe_serialization=True, max_shard_size=max_shard_size)
        processor.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        elif hasattr(model.config, "text_config"):
            logger.warning("%s: saved without tokenizer files (pass tokenizer=...)", out_dir)
    return out_dir


def has_tokenizer(directory: Union[str, os.PathLike]) -> bool:
    """Whether ``directory`` holds tokenizer files."""
    return any((Path(directory) / name).exists() for name in TOKENIZER_FILES)


def load_processors(directory: Union[str, os.PathLike]) -> Tuple[CLIPImageProcessor, Optional[object]]:
    """The image processor and (when present) the tokenizer saved in a checkpoint directory."""
    directory = Path(directory)
    if not (directory / "preprocessor_config.json").exists():
        raise ValueError(f"{directory}: no preprocessor_config.json (not a complete checkpoint directory)")
    image_processor = CLIPImageProcessor.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory) if has_tokenizer(directory) else None
    return image_processor, tokenizer


def _weight_files(directory: Path, prefix: str) -> List[Path]:
    """The weight files of ``directory`` holding tensors named ``prefix...``: the shards of an index, else one file."""
    for name in WEIGHT_INDEX_FILES:
        index = directory / name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return [directory / shard for shard in sorted({s for k, s in weight_map.items() if k.startswith(prefix)})]
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return [directory / name]
    raise ValueError(f"{directory}: no weights found (expected one of {WEIGHT_FILES + WEIGHT_INDEX_FILES})")


def read_checkpoint_tensors(directory: Union[str, os.PathLike], prefix: str = "") -> Dict[str, torch.Tensor]:
    """The tensors of a Hugging Face checkpoint directory whose names start with ``prefix``.

    Reads a sharded checkpoint through its ``*.index.json`` (only the shards holding such tensors) or a single
    ``model.safetensors`` / ``pytorch_model.bin``; torch files are loaded with ``weights_only=True``.
    """
    tensors: Dict[str, torch.Tensor] = {}
    for file in _weight_files(Path(directory), prefix):
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as handle:
                tensors.update({name: handle.get_tensor(name) for name in handle.keys() if name.startswith(prefix)})
        else:
            loaded = torch.load(str(file), map_location="cpu", weights_only=True)
            tensors.update({name: tensor for name, tensor in loaded.items() if name.startswith(prefix)})
    return tensors
