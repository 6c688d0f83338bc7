"""Image and text embeddings of a CLIP-like model (``get_image_features`` / ``get_text_features``): the one way.

Per batch, :func:`embed_images` and :func:`embed_texts` return the projected, unnormalised embeddings on the model's
device (what DMU's feature extraction stores); :func:`encode_images`, :func:`encode_texts`, :func:`encode_tokens`
and :func:`encode_pairs` return L2-normalised float32 embeddings on the CPU for a whole set (what retrieval,
classification and the experiments' evaluator score). :func:`eval_mode` and :func:`model_device` are the helpers
they share.
"""

import contextlib
from typing import Any, Dict, Iterable, Iterator, Sequence, Tuple

import torch
from tqdm.auto import tqdm


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless module)."""
    return next(model.parameters(), torch.empty(0)).device


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put ``model`` in eval mode for the block, restoring its training flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def embeddings_of(output: Any) -> torch.Tensor:
    """Embeddings from ``get_*_features``: a tensor, or (transformers 5) an output with ``pooler_output``."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def normalized(embeddings: torch.Tensor) -> torch.Tensor:
    """L2-normalised float32 rows."""
    return torch.nn.functional.normalize(embeddings.float(), dim=-1)


def embed_images(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected image embeddings ``[B, D]`` of one batch (unnormalised, on the model's device and dtype)."""
    parameter = next(model.parameters(), None)  # a parameterless stand-in takes the pixels as they are
    if parameter is not None:
        pixel_values = pixel_values.to(device=parameter.device, dtype=parameter.dtype)
    return embeddings_of(model.get_image_features(pixel_values=pixel_values))


def embed_texts(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Projected text embeddings ``[B, D]`` of one batch of token ids (unnormalised, on the model's device)."""
    device = model_device(model)
    output = model.get_text_features(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
    return embeddings_of(output)


@torch.no_grad()
def encode_images(model: Any, batches: Iterable[Dict[str, torch.Tensor]], progress: bool = True) -> torch.Tensor:
    """L2-normalised image embeddings ``[N, D]`` (on CPU) of batches holding ``pixel_values``."""
    chunks = []
    for batch in tqdm(batches, desc="images", disable=not progress, leave=False):
        chunks.append(normalized(embed_images(model, batch["pixel_values"])).cpu())
    return torch.cat(chunks)


@torch.no_grad()
def encode_texts(
    model: Any,
    texts: Sequence[str],
    text_tokenizer: Any,
    batch_size: int = 256,
    progress: bool = True,
) -> torch.Tensor:
    """L2-normalised text embeddings ``[N, D]`` (on CPU) of captions, tokenised ``batch_size`` at a time by
    ``text_tokenizer`` (a :class:`~mllm_encoder.data.preprocess.ClipTextTokenizer`: ``input_ids`` and
    ``attention_mask``)."""
    chunks = []
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc="texts", disable=not progress, leave=False):
        tokens = text_tokenizer(texts[start : start + batch_size])
        chunks.append(normalized(embed_texts(model, tokens["input_ids"], tokens["attention_mask"])).cpu())
    return torch.cat(chunks)


@torch.no_grad()
def encode_tokens(model: Any, tokens: Dict[str, torch.Tensor], batch_size: int = 1024) -> torch.Tensor:
    """L2-normalised text embeddings ``[N, D]`` (on CPU) of already tokenised captions (``input_ids``,
    ``attention_mask``), ``batch_size`` rows at a time; each batch is cut after its longest caption (the text
    tower ignores padding, so the embeddings are those of the full rows)."""
    chunks = []
    for start in range(0, len(tokens["input_ids"]), batch_size):
        mask = tokens["attention_mask"][start : start + batch_size]
        length = int(mask.sum(dim=1).max())
        ids = tokens["input_ids"][start : start + batch_size, :length]
        chunks.append(normalized(embed_texts(model, ids, mask[:, :length])).cpu())
    return torch.cat(chunks)


@torch.no_grad()
def encode_pairs(model: Any, batches: Iterable, progress: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised ``(image, text)`` embeddings (on CPU) of collated image-caption batches (``pixel_values``,
    ``input_ids``, ``attention_mask``; pair ``i`` matches ``i``); a ``None`` batch (all samples bad) is skipped."""
    images, texts = [], []
    for batch in tqdm(batches, desc="pairs", disable=not progress, leave=False):
        if batch is None:
            continue
        images.append(normalized(embed_images(model, batch["pixel_values"])).cpu())
        texts.append(normalized(embed_texts(model, batch["input_ids"], batch["attention_mask"])).cpu())
    return torch.cat(images), torch.cat(texts)
