"""Benchmark the sparse MoE layer and the CLIP-MoE image tower against their floors.

Prints a markdown table per device and dtype:

* layer / floor: time of ``SparseMoE`` over the time of one dense FFN applied to ``top_k x tokens`` rows,
  the FLOP floor of top-k routing (goal: <= 1.10);
* naive / layer: time of a naive masked loop (every expert on every token) over ``SparseMoE`` (goal: >= 1);
* tower ratio: time of the CLIP-MoE image tower over the dense tower, next to its FLOP ratio
  ``1 + (k - 1) x FFN share`` (about 1.61 for top-2 ViT-L/14-336; goal: within 1.10 of it).

Usage: ``python scripts/bench_moe.py [--small] [--devices cpu cuda] [--dtypes float32 bfloat16]``.
``--small`` scales the widths down 4x for a quick run; the default is ViT-L/14-336 (D 1024, I 4096, 24 layers).
"""

import argparse
import functools
import statistics
import time
from typing import Callable, List

import torch

from mllm_encoder import CLIPMoEVisionConfig, CLIPMoEVisionModel
from mllm_encoder.layers import FeedForward
from mllm_encoder.moe import SparseMoE
from mllm_encoder.upcycle import sparse_upcycle

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENS_PER_IMAGE = 577


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def naive_masked_moe(layer: SparseMoE, tokens: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, weighted by the (mostly zero) routing weights."""
    decision = layer.router(tokens)
    out = torch.zeros_like(tokens)
    fc1, fc2 = layer.experts.fc1, layer.experts.fc2
    for e in range(layer.num_experts):
        hidden = layer.experts.activation_fn(torch.addmm(fc1.bias[e], tokens, fc1.weight[e].t()))
        gate = (decision.weights * (decision.expert_ids == e)).sum(-1, keepdim=True)
        out += gate * torch.addmm(fc2.bias[e], hidden, fc2.weight[e].t())
    return out


def vision_config(args: argparse.Namespace) -> CLIPMoEVisionConfig:
    scale = 4 if args.small else 1
    return CLIPMoEVisionConfig(
        hidden_size=1024 // scale,
        intermediate_size=4096 // scale,
        num_hidden_layers=24 // scale,
        num_attention_heads=16 // scale,
        image_size=336,
        patch_size=14,
    )


def flop_ratio(config: CLIPMoEVisionConfig, top_k: int) -> float:
    """Multiply-accumulates of the MoE tower over the dense tower (per token, attention included)."""
    d, i, t = config.hidden_size, config.intermediate_size, TOKENS_PER_IMAGE
    ffn = 2 * d * i
    dense = 4 * d * d + 2 * t * d + ffn
    return (dense + (top_k - 1) * ffn) / dense


def layer_rows(args, device, dtype, config) -> List[str]:
    torch.manual_seed(0)
    layer = SparseMoE(config.hidden_size, config.intermediate_size, args.num_experts, args.top_k).to(
        device, dtype
    )
    dense = FeedForward(config).to(device, dtype)
    rows = []
    for images in args.images:
        tokens = torch.randn(images * TOKENS_PER_IMAGE, config.hidden_size, device=device, dtype=dtype)
        floor_input = tokens.repeat(args.top_k, 1)
        with torch.no_grad():
            t_moe = timed(functools.partial(layer, tokens), device, args.repeats)
            t_floor = timed(functools.partial(dense, floor_input), device, args.repeats)
            t_naive = timed(functools.partial(naive_masked_moe, layer, tokens), device, args.repeats)
        rows.append(
            f"| layer | {tokens.shape[0]} | {t_moe * 1e3:.2f} | {t_floor * 1e3:.2f} | {t_moe / t_floor:.2f} "
            f"| {t_naive / t_moe:.2f} | |"
        )
    return rows


def tower_rows(args, device, dtype, config) -> List[str]:
    torch.manual_seed(0)
    dense = CLIPMoEVisionModel(config).to(device, dtype).eval()
    moe = sparse_upcycle(dense, args.num_experts, args.top_k).to(device, dtype).eval()
    rows = []
    for images in args.tower_images:
        pixels = torch.randn(images, 3, config.image_size, config.image_size, device=device, dtype=dtype)
        with torch.no_grad():
            t_moe = timed(functools.partial(moe, pixels), device, args.repeats)
            t_dense = timed(functools.partial(dense, pixels), device, args.repeats)
        rows.append(
            f"| tower | {images * TOKENS_PER_IMAGE} | {t_moe * 1e3:.1f} | {t_dense * 1e3:.1f} | "
            f"{t_moe / t_dense:.2f} | | {flop_ratio(config, args.top_k):.2f} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"], help="cuda is skipped when absent")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    parser.add_argument(
        "--images", nargs="+", type=int, default=[1, 16], help="images of 577 tokens per batch"
    )
    parser.add_argument("--tower-images", nargs="+", type=int, default=[1, 16], help="batch sizes of the tower run")
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--small", action="store_true", help="widths / 4 and 6 layers, for a quick run")
    parser.add_argument("--skip-tower", action="store_true", help="only the layer benchmark")
    args = parser.parse_args()
    config = vision_config(args)
    print(
        f"E={args.num_experts} top-{args.top_k}, D={config.hidden_size} I={config.intermediate_size}, "
        f"{config.num_hidden_layers} layers; torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
    )
    for device_name in args.devices:
        if device_name == "cuda" and not torch.cuda.is_available():
            continue
        device = torch.device(device_name)
        label = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        for dtype_name in args.dtypes:
            print(f"\n{label}, {dtype_name}\n")
            print("| what | tokens | MoE ms | floor/dense ms | MoE / floor | naive / MoE | FLOP ratio |")
            print("|---|---|---|---|---|---|---|")
            rows = layer_rows(args, device, DTYPES[dtype_name], config)
            if not args.skip_tower:
                rows += tower_rows(args, device, DTYPES[dtype_name], config)
            print("\n".join(rows), flush=True)


if __name__ == "__main__":
    main()
