"""The contrastive loss of CLIP-MoE: one function for the model's own loss and for distributed training.

Like open_clip's ``ClipLoss`` with local loss and gathered features: each rank scores its own pairs against
every rank's pairs as negatives. ``scale`` is the inverse temperature: the model's learnable
``logit_scale.exp()``, or ``1 / temperature`` for a fixed temperature (the DMU recipe uses 0.01).
"""

from typing import Optional, Union

import torch
import torch.nn.functional as F

from mllm_encoder.distributed import DistState, all_gather_with_grad, gather_sizes


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
    if image_embeds.shape != text_embeds.shape or image_embeds.ndim != 2:
        raise ValueError(
            f"expected two [batch, dim] embeddings, got {tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}"
        )
    state = state or DistState()
    image = F.normalize(image_embeds.float(), dim=-1)
    text = F.normalize(text_embeds.float(), dim=-1)
    sizes = gather_sizes(image.shape[0], state)
    all_image = all_gather_with_grad(image, state, sizes)
    all_text = all_gather_with_grad(text, state, sizes)
    logits_per_image = scale * image @ all_text.t()
    logits_per_text = scale * text @ all_image.t()
    labels = torch.arange(image.shape[0], device=image.device) + sum(sizes[: state.rank])
    loss_i2t = F.cross_entropy(logits_per_image, labels, label_smoothing=label_smoothing)
    loss_t2i = F.cross_entropy(logits_per_text, labels, label_smoothing=label_smoothing)
    return (loss_i2t + loss_t2i) / 2
