"""``clip-moe convert``: read a foreign checkpoint, convert it, optionally upcycle, save a complete directory."""

import logging
from pathlib import Path
from typing import Dict, Optional

import torch

from mllm_encoder.atomic import PathLike
from mllm_encoder.checkpoint import (
    OPEN_CLIP_WEIGHT_FILES,
    WEIGHT_FILES,
    check_output_dir,
    default_image_processor,
    read_weights_file,
    save_checkpoint,
)
from mllm_encoder.conversion.openai import convert_openai_clip
from mllm_encoder.conversion.timm import convert_timm_clip_vit
from mllm_encoder.conversion.tokenizer import OPENAI_VOCAB_SIZE, build_clip_tokenizer
from mllm_encoder.modeling_clip_moe import CLIPMoEModel, CLIPMoEVisionModel
from mllm_encoder.upcycle import sparse_upcycle

logger = logging.getLogger(__name__)

SOURCE_FORMATS = ("official-clip-moe", "openai", "timm")
# The weight files a source directory may hold, safetensors first.
SOURCE_WEIGHT_FILES = tuple(
    sorted(WEIGHT_FILES + OPEN_CLIP_WEIGHT_FILES, key=lambda name: not name.endswith(".safetensors"))
)


def _weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        for name in SOURCE_WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
    raise ValueError(
        f"{path}: no weights found (a .safetensors/.pt/.pth/.bin file, or a directory with one of "
        f"{SOURCE_WEIGHT_FILES})"
    )


def read_state_dict(path: PathLike) -> Dict[str, torch.Tensor]:
    """Read a state dict safely: safetensors, or a pickle through ``torch.load(weights_only=True)``.

    Unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` and a DistributedDataParallel ``module.`` prefix.
    TorchScript archives (OpenAI's JIT ``.pt`` files) are refused: load them with their own code and
    save ``model.state_dict()``.
    """
    weights = _weights_file(Path(path))
    loaded = read_weights_file(weights)
    for wrapper in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ValueError(f"{weights}: expected a state dict of tensors, found {type(loaded).__name__}")
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in loaded.items()}


def _converted_model(state_dict, source_format: str, top_k: int, num_heads: Optional[int]):
    if source_format == "timm":
        config, converted = convert_timm_clip_vit(state_dict, num_heads=num_heads)
        model = CLIPMoEVisionModel(config)
    else:
        config, converted = convert_openai_clip(state_dict, top_k=top_k)
        if source_format == "openai" and config.vision_config.num_experts > 1:
            raise ValueError("the checkpoint has MoE blocks: use --from official-clip-moe")
        model = CLIPMoEModel(config)
    model.load_state_dict(converted, strict=True)
    return model


def _tokenizer_for(model, tokenizer_dir: Optional[PathLike], out_dir: Path):
    """The tokenizer to save beside a two-tower model: copied, generated, or none (with a warning)."""
    if not hasattr(model.config, "text_config"):
        return None
    text = model.config.text_config
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tokenizer_dir, model_max_length=text.max_position_embeddings)
    if text.vocab_size != OPENAI_VOCAB_SIZE:
        logger.warning(
            "vocabulary size %d is not OpenAI CLIP's %d: no tokenizer written to %s (pass --tokenizer DIR)",
            text.vocab_size,
            OPENAI_VOCAB_SIZE,
            out_dir,
        )
        return None
    return build_clip_tokenizer(context_length=text.max_position_embeddings)


def convert_checkpoint(
    source: PathLike,
    out_dir: PathLike,
    source_format: str,
    top_k: int = 2,
    num_experts: Optional[int] = None,
    num_heads: Optional[int] = None,
    tokenizer_dir: Optional[PathLike] = None,
    dtype: Optional[torch.dtype] = None,
    overwrite: bool = False,
) -> Path:
    """Convert ``source`` (format ``source_format``) into a complete CLIP-MoE directory ``out_dir``.

    ``num_experts`` sparse-upcycles a dense result; ``top_k`` is the routing of MoE checkpoints (not
    stored in the source) or of the upcycled model. ``out_dir`` is checked first (see
    :func:`mllm_encoder.checkpoint.check_output_dir`; ``overwrite`` replaces an earlier CLIP-MoE checkpoint).
    """
    if source_format not in SOURCE_FORMATS:
        raise ValueError(f"--from must be one of {SOURCE_FORMATS}, got {source_format!r}")
    out_dir = Path(out_dir)
    inputs = [source] + ([tokenizer_dir] if tokenizer_dir is not None else [])
    check_output_dir(out_dir, inputs, overwrite)
    try:
        model = _converted_model(read_state_dict(source), source_format, top_k, num_heads)
    except KeyError as error:  # a tensor the layout needs is absent (an incomplete or differently laid out file)
        raise ValueError(
            f"{source}: the state dict lacks the tensor {error.args[0]!r}; is it a complete --from {source_format} "
            "checkpoint?"
        ) from error
    if num_experts is not None and num_experts > 1:
        model = sparse_upcycle(model, num_experts, top_k)
    if dtype is not None:
        model = model.to(dtype)
    tokenizer = _tokenizer_for(model, tokenizer_dir, out_dir)
    image_size = getattr(model.config, "vision_config", model.config).image_size
    save_checkpoint(
        model,
        out_dir,
        image_processor=default_image_processor(image_size),
        tokenizer=tokenizer,
        overwrite=overwrite,
        inputs=inputs,
    )
    logger.info("converted %s (%s) to %s", source, source_format, out_dir)
    return out_dir
