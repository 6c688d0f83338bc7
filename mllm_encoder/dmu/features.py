"""Image and text feature extraction, sharded by rank and saved as safetensors shards."""

import logging
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import numpy as np
import torch
from safetensors.numpy import load_file, save
from tqdm.auto import tqdm

from mllm_encoder.atomic import atomic_write_bytes
from mllm_encoder.distributed import DistState

logger = logging.getLogger(__name__)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    dataset: torch.utils.data.Dataset,
    collate_fn: Callable,
    out_dir: Union[str, Path],
    state: Optional[DistState] = None,
    batch_size: int = 256,
    num_workers: int = 0,
    device: Union[str, torch.device] = "cpu",
) -> Path:
    """Embed this rank's share (indices ``rank::world_size``) of ``dataset``; write ``features_rank{r}.safetensors``.

    The shard holds ``index`` (the samples' stable indices), ``image`` and ``text`` (projected, unnormalised
    embeddings, float32). Bad samples dropped by ``collate_fn`` are simply absent (a batch of only bad samples,
    ``None``, is skipped: the collator counts them and enforces its bad-sample limit).
    """
    if len(dataset) == 0:
        raise ValueError("the training set is empty: no sample to extract features from")
    state = state or DistState()
    subset = torch.utils.data.Subset(dataset, list(range(state.rank, len(dataset), state.world_size)))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, collate_fn=collate_fn, num_workers=num_workers)
    core = _unwrap(model).eval()
    parts: Dict[str, list] = {"index": [], "image": [], "text": []}
    for batch in tqdm(loader, desc=f"extract features (rank {state.rank})", disable=not state.is_main):
        if batch is None:
            logger.warning("skipping a batch whose samples all failed to load")
            continue
        parts["index"].append(batch["index"].cpu().numpy())
        parts["image"].append(
            core.get_image_features(pixel_values=batch["pixel_values"].to(device)).float().cpu().numpy()
        )
        text = core.get_text_features(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        )
        parts["text"].append(text.float().cpu().numpy())
    arrays = {key: np.concatenate(value) if value else np.zeros((0,), np.float32) for key, value in parts.items()}
    arrays["index"] = arrays["index"].astype(np.int64)
    path = Path(out_dir) / f"features_rank{state.rank}.safetensors"
    atomic_write_bytes(path, save(arrays))
    logger.info("wrote %d feature rows to %s", len(arrays["index"]), path)
    return path


def load_features(feature_dir: Union[str, Path]) -> Dict[str, np.ndarray]:
    """Concatenate every rank's shard in ``feature_dir``, sorted by sample index."""
    shards = sorted(Path(feature_dir).glob("features_rank*.safetensors"))
    if not shards:
        raise ValueError(f"no feature shards (features_rank*.safetensors) in {feature_dir}")
    loaded = [load_file(str(shard)) for shard in shards]
    if not any(len(part["index"]) for part in loaded):
        raise ValueError(
            f"{feature_dir}: the feature shards hold no sample: every training sample was bad or the training set is "
            "empty (see the bad-sample warnings of the extraction)"
        )
    arrays = {
        key: np.concatenate([part[key] for part in loaded if len(part[key])]) for key in ("index", "image", "text")
    }
    order = np.argsort(arrays["index"], kind="stable")
    return {key: value[order] for key, value in arrays.items()}
