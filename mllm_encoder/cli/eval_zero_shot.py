"""``clip-moe eval retrieval`` and ``clip-moe eval classify``: zero-shot evaluation of a checkpoint."""

import argparse
import logging
from pathlib import Path
from typing import Any, Dict, Tuple

from mllm_encoder.atomic import atomic_write_json, check_output
from mllm_encoder.data.retrieval_sets import RETRIEVAL_FORMATS

logger = logging.getLogger(__name__)


def load_model_and_processors(model_dir: str, device: str) -> Tuple[Any, Any, Any]:
    """``(model, image_processor, tokenizer)`` of a HF CLIP or CLIP-MoE directory, model in eval mode
    (loaded strictly: a checkpoint with missing or unexpected tensors is refused)."""
    from mllm_encoder.checkpoint import load_processors
    from mllm_encoder.loading import load_clip_moe

    image_processor, tokenizer = load_processors(model_dir)
    if tokenizer is None:
        raise ValueError(f"{model_dir}: no tokenizer files; zero-shot evaluation needs the text tower's tokenizer")
    model = load_clip_moe(model_dir).to(device).eval()
    return model, image_processor, tokenizer


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _write_json(path: str, data: Dict[str, Any]) -> None:
    atomic_write_json(path, data)
    print(f"wrote {path}")


def run_retrieval(args: argparse.Namespace) -> None:
    """Handler of ``clip-moe eval retrieval``."""
    check_output(args.output, [args.model, args.data, args.image_root], args.overwrite)
    from mllm_encoder.data.retrieval_sets import read_retrieval_set
    from mllm_encoder.eval.retrieval import evaluate_retrieval, format_retrieval_table

    model, image_processor, tokenizer = load_model_and_processors(args.model, args.device or _default_device())
    split = None if args.split == "all" else args.split
    data = read_retrieval_set(args.data, args.format, split, args.image_root, args.image_column, args.caption_column)
    metrics = evaluate_retrieval(
        model, data, image_processor, tokenizer, batch_size=args.batch_size, num_workers=args.num_workers
    )
    print(format_retrieval_table({Path(args.model).name: metrics}))
    print(f"{metrics['num_images']} images, {metrics['num_captions']} captions")
    if args.output:
        _write_json(args.output, {"model": args.model, "data": args.data, **metrics})


def run_classify(args: argparse.Namespace) -> None:
    """Handler of ``clip-moe eval classify``."""
    check_output(args.output, [args.model, args.image_folder, args.classes, args.templates], args.overwrite)
    from mllm_encoder.eval.classification import DEFAULT_TEMPLATES, read_lines, zero_shot_classify

    model, image_processor, tokenizer = load_model_and_processors(args.model, args.device or _default_device())
    class_names = read_lines(args.classes) if args.classes else None
    templates = read_lines(args.templates) if args.templates else list(DEFAULT_TEMPLATES)
    result = zero_shot_classify(
        model,
        tokenizer,
        args.image_folder,
        class_names,
        templates,
        image_processor,
        batch_size=args.batch_size,
    )
    print("| class | top-1 |\n|---|---|")
    for name, accuracy in result["per_class"].items():
        print(f"| {name} | {accuracy:.2f} |")
    print(f"top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f}  ({result['num_images']} images)")
    if args.output:
        _write_json(args.output, {"model": args.model, "image_folder": args.image_folder, **result})


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF CLIP or CLIP-MoE checkpoint directory")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--output", default=None, help="write the metrics to this JSON file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``retrieval`` and ``classify`` to the ``clip-moe eval`` group."""
    retrieval = commands.add_parser("retrieval", help="zero-shot image-text retrieval (I2T/T2I Recall@1/5/10)")
    _common_arguments(retrieval)
    retrieval.add_argument("--data", required=True, help="Karpathy-split JSON, JSON/JSONL, CSV/TSV or image folder")
    retrieval.add_argument("--format", default="auto", choices=["auto", *RETRIEVAL_FORMATS])
    retrieval.add_argument("--split", default="test", help="Karpathy split to evaluate ('all' for every image)")
    retrieval.add_argument("--image-root", default=None, help="folder image paths are relative to")
    retrieval.add_argument("--image-column", default=None, help="CSV/TSV image path column")
    retrieval.add_argument("--caption-column", default=None, help="CSV/TSV caption column")
    retrieval.add_argument("--num-workers", type=int, default=0, help="data-loader workers")
    retrieval.set_defaults(func=run_retrieval)
    classify = commands.add_parser("classify", help="zero-shot classification of an image folder (root/<class>/)")
    _common_arguments(classify)
    classify.add_argument("--image-folder", required=True, help="root/<class>/*.jpg")
    classify.add_argument("--classes", default=None, help="class names, one per line, in sorted folder order")
    classify.add_argument("--templates", default=None, help="prompt templates with {}, one per line")
    classify.set_defaults(func=run_classify)
