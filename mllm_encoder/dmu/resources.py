"""What every DMU stage loads and saves: models, processors, the training data of a run, checkpoints.

Nothing is cached per process. A run builds its training data once (:func:`load_training_data`: the index
under the run directory, shared by every rank, stage and resume) and hands it to its stages; a single-stage
command builds it under its ``--index-dir``. Models and processors are read when a stage needs them.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Tuple

import torch

from mllm_encoder.atomic import PathLike
from mllm_encoder.checkpoint import load_processors, save_checkpoint
from mllm_encoder.data import (
    ImageTextCollator,
    build_record_index,
    build_shard_index,
    detect_format,
    load_image_text_dataset,
)
from mllm_encoder.dmu.config import DataSection
from mllm_encoder.loading import load_clip_moe

INDEXED_FORMATS = ("sharegpt4v", "folder", "csv", "tsv", "webdataset")  # the formats with an index directory
RECORDS_INDEX, SHARDS_INDEX = "records", "shards"  # the parts of an index directory (records file, tar shards)


def load_model(model_dir: PathLike) -> torch.nn.Module:
    """A two-tower model from a CLIP-MoE (dense or MoE) or Hugging Face CLIP directory, in float32."""
    model = load_clip_moe(str(model_dir)).float()
    if not hasattr(model, "text_model") or not hasattr(model, "vision_model"):
        raise ValueError(f"{model_dir}: DMU needs both towers (a CLIP / CLIP-MoE model, not a single tower)")
    return model


def processors(directory: PathLike):
    """The image processor and tokenizer of a checkpoint directory."""
    return load_processors(str(directory))


@dataclass
class TrainingData:
    """The training set of one run: built once, shared by its stages, closed when the run ends."""

    dataset: Any
    section: DataSection

    def __len__(self) -> int:
        return len(self.dataset)

    def for_stage(self) -> Tuple[Any, ImageTextCollator]:
        """The dataset and a fresh collator for one stage: the stage counts (and names) its own bad samples."""
        self.dataset.reset_bad_samples()
        return self.dataset, ImageTextCollator(max_bad_fraction=self.section.max_bad_fraction, dataset=self.dataset)

    def close(self) -> None:
        """Close the files the dataset holds open (tar shards)."""
        close = getattr(self.dataset, "close", None)
        if close is not None:
            close()


def data_format(data: DataSection) -> str:
    """The format of ``data.train`` (``data.format``, or detected from the path)."""
    return detect_format(data.train) if data.format == "auto" else data.format


def is_data_index(path: Path) -> bool:
    """Whether the directory ``path`` holds only what :func:`build_data_index` writes (``records/``, ``shards/``)."""
    return all(entry.name.startswith(".") or entry.name in (RECORDS_INDEX, SHARDS_INDEX) for entry in path.iterdir())


def build_data_index(data: DataSection, index_dir: PathLike, accelerator=None) -> None:
    """Build the index of ``data.train`` in ``index_dir`` once for all ranks (reused when it is there already).

    Tar shards are split over the ranks (each indexes ``shards[rank::world_size]``); a records file
    (JSON/JSONL/CSV/TSV, img2dataset folder) is read by the main process. An error on any rank is raised on
    every rank (a ``ValueError`` with the first rank's message), so no rank waits forever.
    """
    rank, world_size = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    index_dir, error = Path(index_dir), None
    try:
        fmt = data_format(data)
        if fmt == "webdataset":
            build_shard_index(data.train, index_dir / SHARDS_INDEX, rank, world_size)
        elif fmt in INDEXED_FORMATS and rank == 0:
            build_record_index(
                data.train,
                fmt,
                data.image_root,
                allow_absolute_paths=data.allow_absolute_paths,
                index_dir=index_dir / RECORDS_INDEX,
            )
    except (ValueError, OSError) as caught:
        if world_size == 1:
            raise
        error = str(caught) if isinstance(caught, ValueError) else f"data.train: cannot read {data.train} ({caught})"
    if world_size > 1:
        from accelerate.utils import gather_object

        errors = [message for message in gather_object([error]) if message]
        if errors:
            raise ValueError(errors[0])
        accelerator.wait_for_everyone()


def load_training_data(
    data: DataSection,
    processors_dir: PathLike,
    index_dir: Optional[PathLike] = None,
    accelerator=None,
    context_length: Optional[int] = None,
) -> TrainingData:
    """The training set of ``data`` preprocessed with the processors of ``processors_dir``.

    With ``index_dir`` (a run's, or a stage command's ``--index-dir``), the index is built there once
    (:func:`build_data_index`, ranks coordinated through ``accelerator``) and every rank memory-maps it; an index
    saved there from the same data is reused. Without it the index is built in memory. ``context_length``
    overrides the tokenizer's (e.g. a run's ``dmu.text_context``).
    """
    image_processor, tokenizer = processors(processors_dir)
    if tokenizer is None:
        raise ValueError(f"{processors_dir}: the checkpoint has no tokenizer files, needed to encode captions")
    fmt = data_format(data)
    if index_dir is not None:
        build_data_index(data, index_dir, accelerator)
        index_dir = Path(index_dir) / (SHARDS_INDEX if fmt == "webdataset" else RECORDS_INDEX)
    dataset = load_image_text_dataset(
        data.train,
        format=fmt,
        image_root=data.image_root,
        image_processor=image_processor,
        tokenizer=tokenizer,
        context_length=context_length,
        random_access=True,
        allow_absolute_paths=data.allow_absolute_paths,
        index_dir=index_dir if fmt in INDEXED_FORMATS else None,
    )
    return TrainingData(dataset, data)


def save_model(model: torch.nn.Module, out_dir: PathLike, processors_dir: PathLike) -> Path:
    """A complete checkpoint directory with the image processor and tokenizer of ``processors_dir``."""
    image_processor, tokenizer = processors(processors_dir)
    return save_checkpoint(model, out_dir, image_processor=image_processor, tokenizer=tokenizer, overwrite=True)
