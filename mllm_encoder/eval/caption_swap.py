"""Caption-swap accuracy: an image must prefer its own caption over copies with one attribute changed."""

from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

Sample = Dict[str, Any]


def set_attribute(sample: Sample, attribute: str, value: Any) -> Sample:
    """A copy of ``sample`` with the top-level ``attribute`` set to ``value``."""
    return {**sample, attribute: value}


def swapped_captions(
    sample: Sample,
    attribute: str,
    values: Sequence[Any],
    caption: Callable[[Sample], str],
    assign: Optional[Callable[[Sample, str, Any], Sample]] = None,
) -> List[str]:
    """The options of one caption swap: ``caption`` of ``sample`` with ``attribute`` set to each of ``values``, in
    order (``assign`` sets it; default :func:`set_attribute`)."""
    assign = assign or set_attribute
    return [caption(assign(sample, attribute, value)) for value in values]


def caption_swap_accuracy(image_embeds: torch.Tensor, option_embeds: torch.Tensor, labels: torch.Tensor) -> float:
    """Percent of images whose true caption scores strictly above every swapped one.

    ``image_embeds`` ``[N, D]``; ``option_embeds`` ``[N, V, D]``: per image, the caption with the attribute set
    to each of its ``V`` values; ``labels`` ``[N]``: which option is the true caption. A tie counts as a miss:
    a text tower that maps all options to one embedding scores 0; random embeddings score about ``100 / V``.
    """
    if option_embeds.ndim != 3 or option_embeds.shape[0] != image_embeds.shape[0]:
        raise ValueError("option_embeds must be [N, V, D] with one row of options per image")
    scores = torch.einsum("nd,nvd->nv", image_embeds.float(), option_embeds.float())
    labels = labels.long()
    true = scores.gather(1, labels[:, None])
    others = scores.scatter(1, labels[:, None], float("-inf")).max(dim=1, keepdim=True).values
    return 100.0 * (true > others).double().mean().item()
