"""``clip-moe upcycle | assemble | convert | inspect``: make and look at CLIP-MoE checkpoints."""

import argparse
import json
import logging
from pathlib import Path
from typing import List

import torch
from transformers import AutoConfig

from mllm_encoder.checkpoint import check_output_dir, load_processors, read_config_dict, save_checkpoint
from mllm_encoder.conversion.convert import SOURCE_FORMATS, convert_checkpoint
from mllm_encoder.loading import load_clip_moe
from mllm_encoder.model_summary import summarize_model
from mllm_encoder.text_context import stretch_checkpoint
from mllm_encoder.upcycle import assemble_experts, sparse_upcycle

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _layer_list(text: str) -> List[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from error


def _add_moe_arguments(parser: argparse.ArgumentParser, with_num_experts: bool) -> None:
    if with_num_experts:
        parser.add_argument("--num-experts", type=int, default=4, help="experts per MoE layer (default 4)")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    parser.add_argument("--moe-layers", type=_layer_list, help="layer indices made MoE in every tower (default all)")
    parser.add_argument("--vision-moe-layers", type=_layer_list, help="MoE layers of the image tower ('' = dense)")
    parser.add_argument("--text-moe-layers", type=_layer_list, help="MoE layers of the text tower ('' = dense)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random router initialisation")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="save in this dtype (default: the source's)")
    _add_overwrite_argument(parser)


def _add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing CLIP-MoE checkpoint at the output (nothing else)"
    )


def _check_shared_moe_layers(args: argparse.Namespace, source: Path) -> None:
    """``--moe-layers`` applies to every tower without its own flag: an index beyond such a tower's depth is an
    error naming the per-tower flags (a ViT-L image tower has 24 layers, its text tower 12)."""
    if not args.moe_layers:
        return
    config = read_config_dict(source)
    towers = {"vision": config.get("vision_config", config), "text": config.get("text_config")}
    for tower, tower_config in towers.items():
        depth = (tower_config or {}).get("num_hidden_layers")
        if getattr(args, f"{tower}_moe_layers") is not None or not isinstance(depth, int):
            continue
        if max(args.moe_layers) >= depth:
            layers = ",".join(map(str, args.moe_layers))
            raise ValueError(
                f"--moe-layers {layers} applies to every tower, and the {tower} tower of {source} has "
                f"{depth} layers (0-{depth - 1}); choose each tower's layers with --vision-moe-layers and "
                "--text-moe-layers ('' = dense)"
            )


def _moe_layers(args: argparse.Namespace, source: Path):
    _check_shared_moe_layers(args, source)
    per_tower = {"vision": args.vision_moe_layers, "text": args.text_moe_layers}
    if all(v is None for v in per_tower.values()):
        return args.moe_layers
    return {tower: layers if layers is not None else args.moe_layers for tower, layers in per_tower.items()}


def _save_with_processors(model, args: argparse.Namespace, inputs: List[Path]) -> None:
    """Save ``model`` to ``args.out`` with the image processor and tokenizer of ``inputs[0]``."""
    image_processor = tokenizer = None
    if (inputs[0] / "preprocessor_config.json").exists():
        image_processor, tokenizer = load_processors(inputs[0])
    model = model.to(DTYPES[args.dtype]) if args.dtype else model
    save_checkpoint(
        model, args.out, image_processor=image_processor, tokenizer=tokenizer, overwrite=args.overwrite, inputs=inputs
    )
    logger.info("saved %s", args.out)


def run_upcycle(args: argparse.Namespace) -> None:
    check_output_dir(args.out, [args.source], args.overwrite)
    torch.manual_seed(args.seed)
    model = sparse_upcycle(args.source, args.num_experts, args.top_k, _moe_layers(args, args.source))
    _save_with_processors(model, args, [args.source])


def add_assemble_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``clip-moe assemble`` and ``clip-moe dmu assemble`` (one command under two names)."""
    parser.add_argument("models", type=Path, nargs="+", help="N dense checkpoint directories (expert i = model i)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--atol", type=float, default=0.0, help="tolerance for shared (non-FFN) parameters")
    _add_moe_arguments(parser, with_num_experts=False)
    parser.set_defaults(func=run_assemble)


def run_assemble(args: argparse.Namespace) -> None:
    check_output_dir(args.out, args.models, args.overwrite)
    torch.manual_seed(args.seed)
    model = assemble_experts(args.models, args.top_k, _moe_layers(args, args.models[0]), atol=args.atol)
    _save_with_processors(model, args, list(args.models))


def run_convert(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    convert_checkpoint(
        args.source,
        args.out,
        args.source_format,
        top_k=args.top_k,
        num_experts=args.num_experts,
        num_heads=args.num_heads,
        tokenizer_dir=args.tokenizer,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        overwrite=args.overwrite,
    )


def run_stretch_text(args: argparse.Namespace) -> None:
    check_output_dir(args.out, [args.source], args.overwrite)
    stretch_checkpoint(args.source, args.out, args.positions, args.keep, args.overwrite, inputs=[args.source])
    logger.info("saved %s (text context %d)", args.out, args.positions)


def _format_layers(layers: List[int], total: int) -> str:
    if not layers:
        return "none (dense)"
    if layers == list(range(total)):
        return f"all {total}"
    return ",".join(map(str, layers))


def print_summary(directory: Path, summary) -> None:
    """Print an ``inspect`` report."""
    print(f"{directory}: {summary.model_class}")
    print(f"{'tower':<8}{'layers':>7}{'width':>7}{'experts':>9}{'top_k':>7}  moe layers")
    for name, tower in summary.towers.items():
        layers = _format_layers(tower.moe_layers, tower.layers)
        print(f"{name:<8}{tower.layers:>7}{tower.hidden_size:>7}{tower.num_experts:>9}{tower.top_k:>7}  {layers}")
    print(f"parameters: {summary.parameters:,} total, {summary.active_parameters:,} active per token")
    for name, tower in summary.towers.items():
        print(f"{name} experts per layer: {' '.join(map(str, tower.experts_per_layer))}")


def run_inspect(args: argparse.Namespace) -> None:
    model = load_clip_moe(args.model)
    summary = summarize_model(model)
    if args.json:
        print(json.dumps({"config": AutoConfig.from_pretrained(args.model).to_dict(), **summary.to_dict()}, indent=2))
    else:
        print_summary(args.model, summary)


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``upcycle``, ``assemble``, ``convert`` and ``inspect``."""
    upcycle = commands.add_parser("upcycle", help="sparse upcycling: copy a dense FFN into N experts")
    upcycle.add_argument("source", type=Path, help="HF CLIP or CLIP-MoE checkpoint directory")
    upcycle.add_argument("out", type=Path, help="output directory")
    _add_moe_arguments(upcycle, with_num_experts=True)
    upcycle.set_defaults(func=run_upcycle)

    assemble = commands.add_parser("assemble", help="DMU: make the FFNs of N dense models the experts of one MoE")
    add_assemble_arguments(assemble)

    convert = commands.add_parser("convert", help="convert released CLIP-MoE, OpenAI/open_clip or timm weights")
    convert.add_argument("source", type=Path, help="weights file (.pt/.pth/.bin/.safetensors) or directory")
    convert.add_argument("out", type=Path, help="output directory")
    convert.add_argument("--from", dest="source_format", required=True, choices=SOURCE_FORMATS)
    convert.add_argument("--top-k", type=int, default=2, help="routing of MoE weights (not stored in them)")
    convert.add_argument("--num-experts", type=int, help="sparse-upcycle the converted dense model")
    convert.add_argument("--num-heads", type=int, help="attention heads (default width // 64)")
    convert.add_argument("--tokenizer", type=Path, help="copy the tokenizer from this directory")
    convert.add_argument("--seed", type=int, default=0, help="seed of the router initialisation when upcycling")
    convert.add_argument("--dtype", choices=sorted(DTYPES), help="save in this dtype")
    _add_overwrite_argument(convert)
    convert.set_defaults(func=run_convert)

    stretch = commands.add_parser("stretch-text", help="stretch the text context (Long-CLIP), e.g. 77 -> 248 tokens")
    stretch.add_argument("source", type=Path, help="HF CLIP or CLIP-MoE checkpoint directory with a tokenizer")
    stretch.add_argument("out", type=Path, help="output directory (a complete checkpoint)")
    stretch.add_argument("--positions", type=int, default=248, help="new text context length (default 248)")
    stretch.add_argument("--keep", type=int, default=20, help="leading positions kept unchanged (default 20)")
    _add_overwrite_argument(stretch)
    stretch.set_defaults(func=run_stretch_text)

    inspect = commands.add_parser("inspect", help="config, parameters (total/active), MoE layers")
    inspect.add_argument("model", type=Path, help="checkpoint directory")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(func=run_inspect)
