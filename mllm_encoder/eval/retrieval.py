"""Zero-shot image-text retrieval: I2T and T2I Recall@K with any number of captions per image."""

import contextlib
import logging
import os
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mllm_encoder.data.dataset import ImageTextDataset, build_transforms
from mllm_encoder.data.images import ImageFileDataset
from mllm_encoder.data.preprocess import ClipImageTransform, ClipTextTokenizer
from mllm_encoder.data.retrieval_sets import RetrievalSet, read_retrieval_set

logger = logging.getLogger(__name__)

DEFAULT_KS = (1, 5, 10)
_CHUNK = 1024  # similarity rows computed at once


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless module)."""
    return next(model.parameters(), torch.empty(0)).device


def default_context_length(model: Any, tokenizer: Any, context_length: Optional[int] = None) -> Optional[int]:
    """``context_length`` if given, else the smaller of the text tower's positions and the tokenizer limit."""
    if context_length is not None:
        return context_length
    text_config = getattr(getattr(model, "config", None), "text_config", None)
    limits = [
        getattr(text_config, "max_position_embeddings", None),
        getattr(tokenizer, "model_max_length", None),
    ]
    limits = [limit for limit in limits if isinstance(limit, int) and limit < 100_000]
    return min(limits) if limits else None


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put ``model`` in eval mode for the block, restoring its training flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _features(output: Any) -> torch.Tensor:
    """Embeddings from ``get_*_features``: a tensor, or (transformers 5) an output with ``pooler_output``."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _normalize(embeddings: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(embeddings.float(), dim=-1)


@torch.no_grad()
def encode_images(model: Any, batches: Iterable[Dict[str, torch.Tensor]], progress: bool = True) -> torch.Tensor:
    """L2-normalised image embeddings ``[N, D]`` (on CPU) of batches holding ``pixel_values``."""
    device = model_device(model)
    dtype = next(model.parameters()).dtype
    chunks = []
    for batch in tqdm(batches, desc="images", disable=not progress, leave=False):
        pixels = batch["pixel_values"].to(device=device, dtype=dtype)
        chunks.append(_normalize(_features(model.get_image_features(pixel_values=pixels))).cpu())
    return torch.cat(chunks)


@torch.no_grad()
def encode_texts(
    model: Any,
    texts: Sequence[str],
    text_tokenizer: ClipTextTokenizer,
    batch_size: int = 256,
    progress: bool = True,
) -> torch.Tensor:
    """L2-normalised text embeddings ``[N, D]`` (on CPU) of captions."""
    device = model_device(model)
    chunks = []
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc="texts", disable=not progress, leave=False):
        tokens = text_tokenizer(texts[start : start + batch_size])
        output = model.get_text_features(
            input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
        )
        chunks.append(_normalize(_features(output)).cpu())
    return torch.cat(chunks)


def _recalls(ranks: torch.Tensor, ks: Sequence[int], prefix: str) -> Dict[str, float]:
    return {f"{prefix}_r{k}": 100.0 * (ranks < k).float().mean().item() for k in ks}


def retrieval_metrics(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    caption_image: Union[Sequence[int], torch.Tensor],
    ks: Sequence[int] = DEFAULT_KS,
) -> Dict[str, float]:
    """Recall@K in percent for both directions from (normalised) embeddings.

    I2T: an image counts at K when any of its captions is among the K most similar captions. T2I: a
    caption counts when its image is among the K most similar images. A rank is the number of
    candidates scoring strictly higher than the (best) correct one, so ties favour the correct answer.
    """
    caption_image = torch.as_tensor(caption_image, dtype=torch.long)
    num_images, num_texts = image_embeds.shape[0], text_embeds.shape[0]
    if caption_image.shape != (num_texts,) or caption_image.min() < 0 or caption_image.max() >= num_images:
        raise ValueError("caption_image must give, for every caption, the index of an existing image")
    owner = torch.nn.functional.one_hot(caption_image, num_images).t().bool()  # [images, texts]
    i2t_ranks, t2i_ranks = [], []
    for start in range(0, num_images, _CHUNK):
        scores = image_embeds[start : start + _CHUNK] @ text_embeds.t()
        best_correct = scores.masked_fill(~owner[start : start + _CHUNK], float("-inf")).max(dim=1).values
        i2t_ranks.append((scores > best_correct[:, None]).sum(dim=1))
    for start in range(0, num_texts, _CHUNK):
        scores = text_embeds[start : start + _CHUNK] @ image_embeds.t()
        correct = scores.gather(1, caption_image[start : start + _CHUNK, None])
        t2i_ranks.append((scores > correct).sum(dim=1))
    metrics = {**_recalls(torch.cat(i2t_ranks), ks, "i2t"), **_recalls(torch.cat(t2i_ranks), ks, "t2i")}
    metrics["rsum"] = sum(metrics.values())
    return {**metrics, "num_images": num_images, "num_captions": num_texts}


def _loader(dataset: Dataset, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)


def _paired_batches(model: Any, loader: Iterable, progress: bool):
    """Embeddings of a loader of collated image-caption batches (pair ``i`` matches ``i``)."""
    images, texts = [], []
    device = model_device(model)
    with torch.no_grad():
        for batch in tqdm(loader, desc="pairs", disable=not progress, leave=False):
            if batch is None:
                continue
            images.append(encode_images(model, [batch], progress=False))
            output = model.get_text_features(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            )
            texts.append(_normalize(_features(output)).cpu())
    return torch.cat(images), torch.cat(texts)


def evaluate_retrieval(
    model: Any,
    data: Union[str, os.PathLike, RetrievalSet, ImageTextDataset, Iterable],
    image_processor: Any = None,
    tokenizer: Any = None,
    format: str = "auto",
    split: Optional[str] = "test",
    image_root: Optional[str] = None,
    context_length: Optional[int] = None,
    batch_size: int = 64,
    num_workers: int = 0,
    ks: Sequence[int] = DEFAULT_KS,
    progress: bool = True,
) -> Dict[str, float]:
    """Zero-shot retrieval Recall@K (percent) of a CLIP-like model (``get_image/text_features``).

    ``data``: a file or folder (read with ``read_retrieval_set``; needs ``image_processor`` and
    ``tokenizer``), a ``RetrievalSet`` (same), an ``ImageTextDataset`` (captions of the same image
    file are grouped) or a loader of collated batches (``pixel_values``/``input_ids``/``attention_mask``,
    pair ``i`` matching ``i``). The model is put in eval mode; its training flag is restored.
    """
    with eval_mode(model):
        if isinstance(data, (str, os.PathLike)):
            data = read_retrieval_set(data, format, split, image_root)
        if isinstance(data, ImageTextDataset):
            transform, text_tokenizer = data.transform, data.text_tokenizer
            data = RetrievalSet.from_records(data.records)
        elif isinstance(data, RetrievalSet):
            context_length = default_context_length(model, tokenizer, context_length)
            transform, text_tokenizer = build_transforms(image_processor, tokenizer, context_length)
        else:
            image_embeds, text_embeds = _paired_batches(model, data, progress)
            return retrieval_metrics(image_embeds, text_embeds, torch.arange(len(text_embeds)), ks)
        return _evaluate_set(model, data, transform, text_tokenizer, batch_size, num_workers, ks, progress)


def _evaluate_set(
    model: Any,
    data: RetrievalSet,
    transform: ClipImageTransform,
    text_tokenizer: ClipTextTokenizer,
    batch_size: int,
    num_workers: int,
    ks: Sequence[int],
    progress: bool,
) -> Dict[str, float]:
    logger.info("retrieval: %d images, %d captions", len(data.images), len(data.captions))
    loader = _loader(ImageFileDataset(data.images, transform), batch_size, num_workers)
    image_embeds = encode_images(model, loader, progress)
    text_embeds = encode_texts(model, data.captions, text_tokenizer, batch_size, progress)
    return retrieval_metrics(image_embeds, text_embeds, data.caption_image, ks)


def format_retrieval_table(results: Dict[str, Dict[str, float]], ks: Sequence[int] = DEFAULT_KS) -> str:
    """A Markdown table with one row per model/method and the I2T/T2I recalls as columns."""
    columns: List[str] = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in ks]
    header = "| model | " + " | ".join(c.replace("_r", " R@") for c in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 1)]
    for name, metrics in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{metrics[c]:.2f}" for c in columns) + " |")
    return "\n".join(lines)
