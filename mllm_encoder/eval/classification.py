"""Zero-shot classification with prompt templates, and per-attribute accuracy on the synthetic set."""

import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader

from mllm_encoder.data.dataset import build_transforms
from mllm_encoder.data.images import ImageFileDataset, read_class_folders
from mllm_encoder.data.preprocess import ClipTextTokenizer
from mllm_encoder.data.synthetic import (
    ATTRIBUTE_PROMPTS,
    load_attributes,
    sample_caption,
    set_object_attribute,
    single_object_labels,
)
from mllm_encoder.encode import encode_images, encode_texts, eval_mode
from mllm_encoder.eval.caption_swap import caption_swap_accuracy, swapped_captions
from mllm_encoder.eval.retrieval import default_context_length

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def class_embeddings(
    model: Any, text_tokenizer: ClipTextTokenizer, class_names: Sequence[str], templates: Sequence[str]
) -> torch.Tensor:
    """``[C, D]`` normalised class embeddings: mean of the normalised prompt embeddings (CLIP's recipe)."""
    if not class_names or not templates:
        raise ValueError("need at least one class name and one template")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"templates must contain '{{}}' for the class name: {bad}")
    prompts = [template.format(name) for name in class_names for template in templates]
    embeds = encode_texts(model, prompts, text_tokenizer, progress=False).view(len(class_names), len(templates), -1)
    return torch.nn.functional.normalize(embeds.mean(dim=1), dim=-1)


def classification_metrics(
    image_embeds: torch.Tensor, class_embeds: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]
) -> Dict[str, Any]:
    """Top-1 / top-5 accuracy and per-class top-1 accuracy, in percent."""
    scores = image_embeds @ class_embeds.t()
    top = scores.topk(min(5, len(class_names)), dim=1).indices
    hits = top == labels[:, None]
    top1 = hits[:, 0].float()
    per_class = {
        name: 100.0 * top1[labels == c].mean().item() for c, name in enumerate(class_names) if (labels == c).any()
    }
    return {
        "top1": 100.0 * top1.mean().item(),
        "top5": 100.0 * hits.any(dim=1).float().mean().item(),
        "per_class": per_class,
        "num_images": int(labels.numel()),
        "predictions": top[:, 0].tolist(),
    }


def _image_batches(images: Any, transform, batch_size: int):
    """Batches with ``label`` from a class-folder path, labelled dataset or loader; plus folder names."""
    if isinstance(images, (str, os.PathLike)):
        paths, labels, folders = read_class_folders(images)
        return DataLoader(ImageFileDataset(paths, transform, labels), batch_size=batch_size), folders
    if isinstance(images, DataLoader) or not hasattr(images, "__getitem__"):
        return images, None
    return DataLoader(images, batch_size=batch_size), None


@torch.no_grad()
def _encode_labelled(model: Any, batches: Iterable, progress: bool):
    labels = []

    def tracked():
        for batch in batches:
            labels.append(batch["label"].reshape(-1).long())
            yield batch

    embeds = encode_images(model, tracked(), progress)
    return embeds, torch.cat(labels)


def zero_shot_classify(
    model: Any,
    tokenizer: Any,
    images_or_loader: Any,
    class_names: Optional[Sequence[str]] = None,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    image_processor: Any = None,
    context_length: Optional[int] = None,
    batch_size: int = 64,
    progress: bool = True,
) -> Dict[str, Any]:
    """Zero-shot classification accuracy (percent) of a CLIP-like model.

    ``images_or_loader``: an image-folder root (``root/<class>/*.jpg``; ``class_names`` default to the
    folder names with ``_`` as spaces, in sorted folder order; needs ``image_processor``), a dataset of
    ``{"pixel_values", "label"}`` or a loader of such batches. Returns ``top1``, ``top5``, ``per_class``,
    ``num_images`` and the top-1 ``predictions``.
    """
    transform = text_tokenizer = None
    context_length = default_context_length(model, tokenizer, context_length)
    if isinstance(images_or_loader, (str, os.PathLike)):
        transform, text_tokenizer = build_transforms(image_processor, tokenizer, context_length)
    else:
        text_tokenizer = ClipTextTokenizer(tokenizer, context_length)
    batches, folders = _image_batches(images_or_loader, transform, batch_size)
    if class_names is None:
        if folders is None:
            raise ValueError("class_names are required unless images come from an image folder")
        class_names = [folder.replace("_", " ") for folder in folders]
    if folders is not None and len(class_names) != len(folders):
        raise ValueError(f"{len(class_names)} class names for {len(folders)} class folders in {images_or_loader}")
    with eval_mode(model):
        class_embeds = class_embeddings(model, text_tokenizer, class_names, templates)
        image_embeds, labels = _encode_labelled(model, batches, progress)
    return classification_metrics(image_embeds, class_embeds, labels, class_names)


def _prompt_accuracy(model, text_tokenizer, data, attribute, image_embeds, prompt: str) -> Optional[float]:
    """Accuracy of classifying ``attribute`` among its values with one prompt, on unambiguous samples."""
    values = data["attributes"][attribute]
    labelled = single_object_labels(data, attribute)
    if not labelled:
        return None
    row_of = {sample["index"]: row for row, sample in enumerate(data["samples"])}
    rows = torch.tensor([row_of[index] for index, _ in labelled])
    labels = torch.tensor([values.index(value) for _, value in labelled])
    class_embeds = class_embeddings(model, text_tokenizer, values, [prompt])
    return classification_metrics(image_embeds[rows], class_embeds, labels, values)["top1"]


def _swap_accuracy(model, text_tokenizer, data, attribute, image_embeds, prompt: str) -> Optional[float]:
    """How often the true caption scores strictly above every caption with ``attribute`` swapped to another value
    (:func:`caption_swap_accuracy`: a tie is a miss)."""
    values = list(data["attributes"][attribute])
    samples = data["samples"]
    captions = [
        text
        for sample in samples
        for text in swapped_captions(sample, attribute, values, sample_caption, set_object_attribute)
    ]
    texts = encode_texts(model, captions, text_tokenizer, progress=False).view(len(samples), len(values), -1)
    truth = [
        sample["background"] if attribute == "background" else sample["objects"][0][attribute] for sample in samples
    ]
    labels = torch.tensor([values.index(value) for value in truth])
    return caption_swap_accuracy(image_embeds, texts, labels)


def per_attribute_accuracy(
    model: Any,
    image_processor: Any,
    tokenizer: Any,
    attributes_file: Union[str, os.PathLike],
    image_root: Optional[Union[str, os.PathLike]] = None,
    prompts: Optional[Dict[str, str]] = None,
    mode: str = "prompt",
    context_length: Optional[int] = None,
    batch_size: int = 64,
    progress: bool = True,
) -> Dict[str, float]:
    """Zero-shot accuracy (percent) per attribute of the synthetic shapes set, plus their ``mean``.

    ``mode="prompt"``: for each attribute (colour, shape, texture, size, position, background) the images
    where it is unambiguous (single-object images; all images for the background) are classified among
    the attribute's values with a prompt (default ``ATTRIBUTE_PROMPTS``, e.g. "a photo of a {} object.");
    chance is ``100 / number of values``. ``mode="caption"``: every image picks among its own caption
    and the captions with the attribute (of its first object) changed to each other value, a stricter
    test of fine-grained binding that needs no generalisation to short prompts.
    """
    if mode not in ("prompt", "caption"):
        raise ValueError(f"mode must be 'prompt' or 'caption', got {mode!r}")
    data = load_attributes(attributes_file)
    prompts = {**ATTRIBUTE_PROMPTS, **data.get("prompts", {}), **(prompts or {})}
    root = Path(attributes_file).parent if image_root is None else Path(image_root)
    context_length = default_context_length(model, tokenizer, context_length)
    transform, text_tokenizer = build_transforms(image_processor, tokenizer, context_length)
    dataset = ImageFileDataset([str(root / sample["image"]) for sample in data["samples"]], transform)
    score = _prompt_accuracy if mode == "prompt" else _swap_accuracy
    with eval_mode(model):
        image_embeds = encode_images(model, DataLoader(dataset, batch_size=batch_size), progress)
        results = {
            attribute: score(model, text_tokenizer, data, attribute, image_embeds, prompts.get(attribute, ""))
            for attribute in data["attributes"]
        }
    results = {attribute: value for attribute, value in results.items() if value is not None}
    results["mean"] = sum(results.values()) / max(len(results), 1)
    return results


def read_lines(path: Union[str, os.PathLike]) -> List[str]:
    """Non-empty, stripped lines of a text file (class names or templates)."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise ValueError(f"{path}: no entries")
    return lines
