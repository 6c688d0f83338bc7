"""Complete, offline-loadable checkpoint directories: weights, config, image processor, tokenizer.

See ``docs/checkpoints.md`` for the format.
"""

import json
import logging
import os
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoTokenizer, CLIPImageProcessor, PreTrainedModel

from mllm_encoder.atomic import atomic_directory, check_replaceable

logger = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
CLIP_MOE_MODEL_TYPES = ("clip_moe", "clip_moe_vision_model", "clip_moe_text_model")
# Every name save_checkpoint writes (transformers 4.x and 5.x): a directory holding anything else is not ours.
CHECKPOINT_FILE_PATTERN = re.compile(
    r"config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|preprocessor_config\.json"
    r"|tokenizer(_config)?\.json|vocab\.json|merges\.txt|special_tokens_map\.json|added_tokens\.json"
)
PathLike = Union[str, os.PathLike]


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


def is_clip_moe_checkpoint(directory: PathLike) -> bool:
    """Whether ``directory`` is a checkpoint as :func:`save_checkpoint` writes it (and holds nothing else)."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        return False
    try:
        model_type = json.loads((directory / "config.json").read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False
    return model_type in CLIP_MOE_MODEL_TYPES and all(
        CHECKPOINT_FILE_PATTERN.fullmatch(entry.name) and entry.is_file() for entry in directory.iterdir()
    )


def _inside(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def check_output_dir(out_dir: PathLike, inputs: Iterable[PathLike] = (), overwrite: bool = False) -> None:
    """Raise ``ValueError`` unless a checkpoint may be written to ``out_dir``; call it before any work.

    Refused: an output that is one of ``inputs`` or contains one; an existing file; a non-empty directory
    that is not a CLIP-MoE checkpoint (see :func:`is_clip_moe_checkpoint`); an existing checkpoint unless
    ``overwrite``. An absent or empty directory is fine.
    """
    out_dir = Path(out_dir)
    resolved = out_dir.resolve()
    for source in inputs:
        if _inside(Path(source).resolve(), resolved):
            raise ValueError(f"{out_dir}: the output is the input {source} (or holds it); choose another output")
    check_replaceable(out_dir, overwrite=True)
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if not is_clip_moe_checkpoint(out_dir):
        raise ValueError(
            f"{out_dir}: exists and is not a CLIP-MoE checkpoint directory; refusing to replace it "
            "(choose a new or empty output directory)"
        )
    if not overwrite:
        raise ValueError(f"{out_dir}: a checkpoint already exists there; pass --overwrite to replace it")


def save_checkpoint(
    model: PreTrainedModel,
    out_dir: PathLike,
    image_processor: Optional[CLIPImageProcessor] = None,
    tokenizer=None,
    max_shard_size: str = "5GB",
    overwrite: bool = False,
    inputs: Sequence[PathLike] = (),
) -> Path:
    """Write ``model`` as a complete checkpoint directory, atomically.

    Writes ``config.json``, ``model.safetensors`` (sharded above ``max_shard_size``),
    ``preprocessor_config.json`` (``image_processor`` or OpenAI CLIP's for the model's image size) and, when
    given, the tokenizer files. A model with a text tower saved without a tokenizer logs a warning.
    ``out_dir`` must pass :func:`check_output_dir` (``overwrite`` replaces an existing CLIP-MoE checkpoint;
    ``inputs`` are the directories the model was read from, never replaced).
    """
    out_dir = Path(out_dir)
    check_output_dir(out_dir, inputs, overwrite)
    processor = image_processor or default_image_processor(_vision_image_size(model))
    with atomic_directory(out_dir, overwrite=overwrite) as staging:
        model.save_pretrained(staging, safe_serialization=True, max_shard_size=max_shard_size)
        processor.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        elif hasattr(model.config, "text_config"):
            logger.warning("%s: saved without tokenizer files (pass tokenizer=...)", out_dir)
    return out_dir


def has_tokenizer(directory: PathLike) -> bool:
    """Whether ``directory`` holds tokenizer files."""
    return any((Path(directory) / name).exists() for name in TOKENIZER_FILES)


def load_processors(directory: PathLike) -> Tuple[CLIPImageProcessor, Optional[object]]:
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
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                shards = sorted({s for k, s in weight_map.items() if k.startswith(prefix)})
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as error:
                raise ValueError(f"{index}: not a weight index ({type(error).__name__}: {error})") from error
            missing = [shard for shard in shards if not (directory / shard).is_file()]
            if missing:
                raise ValueError(f"{index}: lists shard(s) that are missing: {missing}")
            return [directory / shard for shard in shards]
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return [directory / name]
    raise ValueError(f"{directory}: no weights found (expected one of {WEIGHT_FILES + WEIGHT_INDEX_FILES})")


def _read_weight_file(file: Path, prefix: str) -> Dict[str, torch.Tensor]:
    try:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as handle:
                return {name: handle.get_tensor(name) for name in handle.keys() if name.startswith(prefix)}
        loaded = torch.load(str(file), map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as error:
        raise ValueError(f"{file}: corrupt or unreadable weights file ({error})") from error
    if not isinstance(loaded, dict):
        raise ValueError(f"{file}: expected a state dict, found {type(loaded).__name__}")
    return {name: tensor for name, tensor in loaded.items() if name.startswith(prefix)}


def check_weight_files(directory: PathLike) -> None:
    """Raise ``ValueError`` naming the file when a safetensors weight file of ``directory`` is corrupt.

    Reads only the headers (a truncated or damaged file fails here, before any model is built).
    """
    for file in _weight_files(Path(directory), ""):
        if file.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{file}: corrupt or unreadable weights file ({error})") from error


def read_checkpoint_tensors(directory: PathLike, prefix: str = "") -> Dict[str, torch.Tensor]:
    """The tensors of a Hugging Face checkpoint directory whose names start with ``prefix``.

    Reads a sharded checkpoint through its ``*.index.json`` (only the shards holding such tensors) or a single
    ``model.safetensors`` / ``pytorch_model.bin``; torch files are loaded with ``weights_only=True``. A
    corrupt file raises ``ValueError`` naming it.
    """
    tensors: Dict[str, torch.Tensor] = {}
    for file in _weight_files(Path(directory), prefix):
        tensors.update(_read_weight_file(file, prefix))
    return tensors
