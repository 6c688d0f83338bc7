"""Longer text context for CLIP text towers: Long-CLIP's knowledge-preserving position stretching.

The paper trains on ShareGPT4V's long captions at 248 text positions: the first ``keep`` (20) position
embeddings of the 77 are kept as they are (short texts keep their exact embedding), and the remaining
57 are linearly interpolated ``factor`` (4) times, giving 20 + 4 * 57 = 248 positions. Past the last
original position the slope of the last pair is continued (the table has no later neighbour).
"""

import copy
import logging
from pathlib import Path
from typing import Sequence

import torch

from mllm_encoder.atomic import PathLike
from mllm_encoder.checkpoint import load_processors, save_checkpoint
from mllm_encoder.loading import load_clip_moe
from mllm_encoder.modeling_clip_moe import CLIPMoEModel, CLIPMoETextModel

logger = logging.getLogger(__name__)

DEFAULT_KEEP = 20


def stretch_position_embeddings(table: torch.Tensor, positions: int, keep: int = DEFAULT_KEEP) -> torch.Tensor:
    """A ``[positions, D]`` table from a ``[L, D]`` one: rows ``< keep`` copied, the rest interpolated.

    Row ``keep + j`` of the result is the original table read at fractional position
    ``keep + j * (L - keep) / (positions - keep)``, linearly between its two neighbours (extrapolated from the
    last two rows beyond the end). With ``positions = keep + 4 * (L - keep)`` every 4th row is an original row.
    Computed in float32 and returned in the table's dtype.
    """
    if table.ndim != 2:
        raise ValueError(f"expected a [positions, dim] table, got shape {tuple(table.shape)}")
    length = table.shape[0]
    if not 1 <= keep < length - 1:
        raise ValueError(f"keep must be in [1, {length - 2}] for a table of {length} positions, got {keep}")
    if positions <= length:
        raise ValueError(f"positions ({positions}) must exceed the current {length}")
    source = table.detach().float()
    offsets = torch.arange(positions - keep, dtype=torch.float64) * (length - keep) / (positions - keep)
    where = keep + offsets
    lower = where.floor().long().clamp(max=length - 2)  # beyond the last row: the last pair's slope
    fraction = (where - lower).float().unsqueeze(1)
    stretched = source[lower] + fraction * (source[lower + 1] - source[lower])
    return torch.cat([source[:keep], stretched]).to(table.dtype)


def stretch_text_context(model: torch.nn.Module, positions: int, keep: int = DEFAULT_KEEP) -> torch.nn.Module:
    """A copy of a CLIP-MoE (two towers or the text tower) whose text tower reads ``positions`` tokens."""
    if not isinstance(model, (CLIPMoEModel, CLIPMoETextModel)):
        raise ValueError(f"expected a CLIP-MoE model with a text tower, got {type(model).__name__}")
    text_config = model.config.text_config if isinstance(model, CLIPMoEModel) else model.config
    old = text_config.max_position_embeddings
    stretched = copy.deepcopy(model)
    embedding = stretched.text_model.embeddings.position_embedding
    table = stretch_position_embeddings(embedding.weight, positions, keep)
    stretched.text_model.embeddings.position_embedding = torch.nn.Embedding.from_pretrained(table, freeze=False)
    stretched.text_model.embeddings.position_embedding.weight.requires_grad_(embedding.weight.requires_grad)
    new_config = stretched.config.text_config if isinstance(stretched, CLIPMoEModel) else stretched.config
    new_config.max_position_embeddings = positions
    logger.info("text context stretched from %d to %d positions (first %d kept)", old, positions, keep)
    return stretched


def stretch_tokenizer(tokenizer, positions: int):
    """A copy of ``tokenizer`` that pads and truncates to ``positions`` tokens."""
    stretched = copy.deepcopy(tokenizer)
    stretched.model_max_length = positions
    stretched.init_kwargs["model_max_length"] = positions
    return stretched


def stretch_checkpoint(
    source: PathLike,
    out_dir: PathLike,
    positions: int,
    keep: int = DEFAULT_KEEP,
    overwrite: bool = False,
    inputs: Sequence[PathLike] = (),
) -> Path:
    """Write a complete stretched copy of the checkpoint ``source`` (HF CLIP or CLIP-MoE, with its tokenizer) to
    ``out_dir``: weights, config ``max_position_embeddings`` and tokenizer ``model_max_length``."""
    image_processor, tokenizer = load_processors(source)
    if tokenizer is None:
        raise ValueError(f"{source}: no tokenizer files; a stretched checkpoint needs one (model_max_length)")
    model = stretch_text_context(load_clip_moe(source), positions, keep)
    tokenizer = stretch_tokenizer(tokenizer, positions)
    return save_checkpoint(model, out_dir, image_processor, tokenizer, overwrite=overwrite, inputs=inputs)
