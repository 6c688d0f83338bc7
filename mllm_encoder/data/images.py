"""Image-only datasets for evaluation: a list of files (optionally labelled) and class folders."""

from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from mllm_encoder.data.dataset import load_image
from mllm_encoder.data.records import IMAGE_EXTENSIONS, PathLike


class ImageFileDataset(Dataset):
    """``dataset[i]`` = ``{"index", "pixel_values"[, "label"]}``; an unreadable image raises ``ValueError``.

    Evaluation must not silently drop images (the metric would change meaning), so it fails loudly.
    """

    def __init__(self, paths: Sequence[str], transform: Callable, labels: Optional[Sequence[int]] = None):
        if labels is not None and len(labels) != len(paths):
            raise ValueError(f"{len(paths)} images but {len(labels)} labels")
        self.paths, self.transform, self.labels = list(paths), transform, labels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        try:
            image = load_image(self.paths[index])
        except Exception as error:
            raise ValueError(f"cannot read image {self.paths[index]}: {error}") from error
        sample = {"index": torch.tensor(index), "pixel_values": self.transform(image)}
        if self.labels is not None:
            sample["label"] = torch.tensor(self.labels[index])
        return sample


def read_class_folders(root: PathLike) -> Tuple[List[str], List[int], List[str]]:
    """``(image paths, labels, folder names)`` of an image-folder tree ``root/<class>/*.jpg`` (sorted)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: not a directory")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    paths, labels = [], []
    for label, folder in enumerate(folders):
        files = sorted(p for p in (root / folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        paths.extend(str(p) for p in files)
        labels.extend([label] * len(files))
    if not paths:
        raise ValueError(f"{root}: no class sub-folders with images ({', '.join(IMAGE_EXTENSIONS)})")
    return paths, labels, folders
