"""CLIP contrastive loss over features gathered from all ranks (open_clip's local loss)."""

from typing import Optional

import torch
import torch.nn.functional as F

from mllm_encoder.dmu.distributed import DistState, all_gather_with_grad, gather_sizes


def clip_contrastive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    state: Optional[DistState] = None,
    temperature: float = 0.01,
    label_smoothing: float = 0.1,
) -> torch.Tensor:
    """Symmetric InfoNCE of this rank's pairs against every rank's pairs as negatives.

    The loss of rank ``r`` covers its own rows only; with gradients carried through the gather and DDP
    averaging, the mean over ranks equals (in value and gradient) the loss on the concatenated batch
    when the ranks hold equal row counts (after dropped bad samples they may differ slightly).
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
    logits_per_image = image @ all_text.t() / temperature
    logits_per_text = text @ all_image.t() / temperature
    labels = torch.arange(image.shape[0], device=image.device) + sum(sizes[: state.rank])
    loss_i2t = F.cross_entropy(logits_per_image, labels, label_smoothing=label_smoothing)
    loss_t2i = F.cross_entropy(logits_per_text, labels, label_smoothing=label_smoothing)
    return (loss_i2t + loss_t2i) / 2
