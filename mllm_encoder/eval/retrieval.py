"""Zero-shot image-text retrieval: I2T and T2I Recall@K with any number of captions per image."""

import logging
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, Dataset

from mllm_encoder.data.dataset import ImageTextDataset, build_transforms
from mllm_encoder.data.images import ImageFileDataset
from mllm_encoder.data.preprocess import ClipImageTransform, ClipTextTokenizer
from mllm_encoder.data.retrieval_sets import RetrievalSet, read_retrieval_set
from mllm_encoder.encode import encode_images, encode_pairs, encode_texts, eval_mode

logger = logging.getLogger(__name__)

DEFAULT_KS = (1, 5, 10)
_CHUNK = 1024  # similarity rows computed at once


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
            image_embeds, text_embeds = encode_pairs(model, data, progress)
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
