"""The contrastive losses: one function per family, each for the model's own loss and for distributed training.

* :func:`clip_contrastive_loss` (CLIP, softmax): like open_clip's ``ClipLoss`` with local loss and gathered
  features: each rank scores its own pairs against every rank's pairs as negatives. ``scale`` is the inverse
  temperature: the model's learnable ``logit_scale.exp()``, or ``1 / temperature`` for a fixed temperature
  (the DMU recipe uses 0.01).
* :func:`siglip_sigmoid_loss` (SigLIP): every image-text pair is an independent binary classification. Across
  ranks the images are all-gathered with gradient (as the CLIP loss does) rather than passed round a ring
  in chunks as the SigLIP paper does: the same loss and gradients, one collective per step through the same
  injectable :class:`DistState`, at the memory cost of a ``[local, global]`` logit matrix (small next to the
  towers' activations at MLLM-encoder batch sizes).
* :func:`clip_loss_of_logits`, :func:`siglip_loss_of_logits`: the same losses of one process's logit matrix,
  as the models' ``forward(return_loss=True)`` computes them from the logits it returns (no second
  normalisation or matmul).
* :func:`contrastive_loss_for`: a loss kind for a model (its scale and bias), as the DMU trainer calls it with
  the model family's kind (:func:`mllm_encoder.families.loss_kind_of`).
"""

from typing import Callable, Dict, Optional, Union

import torch
import torch.nn.functional as F

from mllm_encoder.distributed import DistState, all_gather_with_grad, gather_sizes


def _normalise_and_gather(image_embeds: torch.Tensor, text_embeds: torch.Tensor, state: DistState):
    """``(image, text, sizes, all_image)``: L2-normalised float32 rows, every rank's row count, and every rank's
    images gathered with gradient (the negatives of this rank's texts)."""
    if image_embeds.ndim != 2 or text_embeds.ndim != 2 or image_embeds.shape[0] != text_embeds.shape[0]:
        raise ValueError(
            f"expected two [batch, dim] embeddings, got {tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}"
        )
    image = F.normalize(image_embeds.float(), dim=-1)
    text = F.normalize(text_embeds.float(), dim=-1)
    sizes = gather_sizes(image.shape[0], state, image.device)
    return image, text, sizes, all_gather_with_grad(image, state, sizes)


def _softmax_pair_loss(
    logits_per_image: torch.Tensor, logits_per_text: torch.Tensor, labels: torch.Tensor, label_smoothing: float
) -> torch.Tensor:
    """Mean of the image->text and text->image cross-entropies (``labels``: each row's matching column)."""
    loss_i2t = F.cross_entropy(logits_per_image, labels, label_smoothing=label_smoothing)
    loss_t2i = F.cross_entropy(logits_per_text, labels, label_smoothing=label_smoothing)
    return (loss_i2t + loss_t2i) / 2


def _sigmoid_pair_loss(logits: torch.Tensor, first_match: int) -> torch.Tensor:
    """``-sum log sigmoid(label * logits)`` per text row, averaged; text row i matches column ``first_match + i``."""
    labels = -torch.ones_like(logits)
    rows = torch.arange(logits.shape[0], device=logits.device)
    labels[rows, rows + first_match] = 1.0
    return -F.logsigmoid(labels * logits).sum(dim=-1).mean()


def _square_logits(logits_per_text: torch.Tensor) -> torch.Tensor:
    if logits_per_text.ndim != 2 or logits_per_text.shape[0] != logits_per_text.shape[1]:
        raise ValueError(
            f"the loss needs as many texts as images (pair i = text i, image i); got logits "
            f"{tuple(logits_per_text.shape)}"
        )
    return logits_per_text.float()


def clip_loss_of_logits(logits_per_text: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE of scaled ``[texts, images]`` cosine logits (text i matches image i), in float32.

    The loss of ``CLIPMoEModel(return_loss=True)``, as HF ``CLIPModel`` computes it; equal to
    :func:`clip_contrastive_loss` of the embeddings on one process.
    """
    logits = _square_logits(logits_per_text)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return _softmax_pair_loss(logits.t(), logits, labels, 0.0)


def siglip_loss_of_logits(logits_per_text: torch.Tensor) -> torch.Tensor:
    """SigLIP's sigmoid loss of ``[texts, images]`` logits (scale and bias applied; text i matches image i), in
    float32: the loss of ``SiglipMoEModel(return_loss=True)``, equal to :func:`siglip_sigmoid_loss` of the
    embeddings on one process."""
    return _sigmoid_pair_loss(_square_logits(logits_per_text), 0)


def clip_contrastive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    scale: Union[float, torch.Tensor],
    state: Optional[DistState] = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Symmetric InfoNCE of matching image/text rows (embeddings are L2-normalised here, in float32).

    With several ranks the loss of rank ``r`` covers its own rows only; with gradients carried through the
    gather and DDP averaging, the mean over ranks equals (in value and gradient) the loss on the
    concatenated batch when the ranks hold equal row counts (after dropped bad samples they may differ).
    On one process it equals HF ``CLIPModel``'s loss for ``scale = logit_scale.exp()``.
    """
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(f"image and text embeddings differ: {tuple(image_embeds.shape)} vs {tuple(text_embeds.shape)}")
    state = state or DistState()
    image, text, sizes, all_image = _normalise_and_gather(image_embeds, text_embeds, state)
    all_text = all_gather_with_grad(text, state, sizes)
    logits_per_image = scale * image @ all_text.t()
    logits_per_text = scale * text @ all_image.t()
    labels = torch.arange(image.shape[0], device=image.device) + sum(sizes[: state.rank])
    return _softmax_pair_loss(logits_per_image, logits_per_text, labels, label_smoothing)


def siglip_sigmoid_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    scale: Union[float, torch.Tensor],
    bias: Union[float, torch.Tensor],
    state: Optional[DistState] = None,
) -> torch.Tensor:
    """SigLIP's sigmoid loss of matching image/text rows (embeddings are L2-normalised here, in float32).

    ``logits = scale * text @ image.T + bias``; the loss is ``-sum log sigmoid(label * logits)`` over every
    pair (label +1 for the matching pair, -1 otherwise) divided by the number of texts, as in HF
    ``SiglipModel``. With several ranks, rank ``r`` scores its own texts against every rank's images
    (gathered with gradient); the mean over ranks equals the loss on the concatenated batch, in value and
    gradient, when the ranks hold equal row counts. ``scale`` is ``logit_scale.exp()`` (learnable or fixed).
    """
    state = state or DistState()
    image, text, sizes, all_image = _normalise_and_gather(image_embeds, text_embeds, state)
    return _sigmoid_pair_loss(scale * text @ all_image.t() + bias, sum(sizes[: state.rank]))


ContrastiveLoss = Callable[[torch.Tensor, torch.Tensor, Optional[DistState]], torch.Tensor]
# Each loss kind's loss of one process's logits; a family's two-tower model names its kind in ``loss_kind``.
LOSS_OF_LOGITS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "softmax": clip_loss_of_logits,
    "sigmoid": siglip_loss_of_logits,
}
LOSS_KINDS = tuple(LOSS_OF_LOGITS)


def contrastive_loss_for(
    model: torch.nn.Module,
    temperature: Optional[float] = None,
    label_smoothing: float = 0.0,
    *,
    kind: str,
    logit_bias: Optional[float] = None,
) -> ContrastiveLoss:
    """The contrastive loss ``kind`` for ``model``: ``loss(image_embeds, text_embeds, state) -> scalar``.

    Args:
        model: a two-tower model (possibly wrapped by DDP / DeepSpeed): its ``logit_scale`` and ``logit_bias``.
        temperature: a fixed temperature (scale ``1 / temperature``); ``None``: the model's ``logit_scale.exp()``
            at each call (gradients flow into it when it is trainable).
        label_smoothing: softmax loss only.
        kind: ``"softmax"`` or ``"sigmoid"``; the model family's is ``mllm_encoder.families.loss_kind_of(model)``.
        logit_bias: a fixed bias of the sigmoid loss; ``None``: the model's ``logit_bias``.
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"loss kind must be one of {LOSS_KINDS}, got {kind!r}")
    if temperature is not None and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    module = getattr(model, "module", model)

    def scale() -> Union[float, torch.Tensor]:
        return 1.0 / temperature if temperature is not None else module.logit_scale.exp()

    if kind == "softmax":
        return lambda image, text, state=None: clip_contrastive_loss(image, text, scale(), state, label_smoothing)
    if label_smoothing:
        raise ValueError(f"label_smoothing applies to the softmax loss only, got {label_smoothing} for sigmoid")
    if logit_bias is None and not isinstance(getattr(module, "logit_bias", None), torch.Tensor):
        raise ValueError(f"{type(module).__name__} has no logit_bias; pass logit_bias for the sigmoid loss")

    def bias() -> Union[float, torch.Tensor]:
        return logit_bias if logit_bias is not None else module.logit_bias

    return lambda image, text, state=None: siglip_sigmoid_loss(image, text, scale(), bias(), state)
