"""Benchmark the sparse MoE layer and the CLIP-MoE image tower against their floors, in one command.

Prints markdown tables per device and dtype (median of ``--repeats`` timed runs after ``--warmup`` untimed ones):

* layer: ``SparseMoE`` per backend over its FLOP floor (one dense FFN on ``top_k x tokens`` rows; goal
  <= 1.10), and a naive masked loop (every expert on every token) over ``SparseMoE``;
* tower, inference (``torch.no_grad``): images/s of the dense tower and of the CLIP-MoE tower per backend
  (``auto``, ``grouped``, ``loop``) and of a Mixtral-style reference loop (``torch.where`` + ``index_add_``
  per expert, as in HF Mixtral and the official CLIP-MoE code), with MoE / dense next to the FLOP ratio
  ``1 + (k - 1) x FFN share`` (1.61 for top-2 ViT-L/14-336); eager, CUDA-graph captured (CUDA),
  ``compile_tower`` and ``compile_tower(mode="reduce-overhead")`` (CUDA graphs through inductor, CUDA);
* tower, training step (forward + backward, fp32 parameters, autocast to the dtype): images/s and peak
  memory (CUDA).

Defaults: on CUDA, ViT-L/14-336 shapes, bf16 and fp16, batches 1/16/64, every section, compiled at batch 64
and CUDA-graph captured at batch 1 in the first dtype (budgeted for at most 8 minutes on an H100, most of it
compiling; not yet timed on a GPU); on CPU, ``--size small``, batches 1/4, no compilation (about 1.5 minutes
on two shared cores with ``--threads 1``). ``--size tiny --compile-backend eager`` is the smoke test's
setting. A variant that fails (e.g. a backend that cannot be captured) prints its error in its row instead
of stopping the run.

Usage: ``python scripts/bench_moe.py [--devices cuda cpu] [--dtypes bfloat16 float16] [--size vit-l]``.
"""

import argparse
import contextlib
import functools
import gc
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from mllm_encoder import CLIPMoEVisionConfig, CLIPMoEVisionModel
from mllm_encoder.compile import compile_tower
from mllm_encoder.layers import FeedForward
from mllm_encoder.moe import SparseMoE
from mllm_encoder.moe.experts import MATMUL_BACKENDS, resolve_backend

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# hidden, intermediate, layers, heads, image size (patch 14)
SIZES = {"vit-l": (1024, 4096, 24, 16, 336), "small": (256, 1024, 6, 4, 336), "tiny": (64, 128, 2, 4, 56)}
SECTIONS = ("layer", "tower", "graph", "train", "compile")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", nargs="+", help="default: cuda when available, else cpu")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), help="default: bf16 fp16 (CUDA), fp32 bf16")
    parser.add_argument("--size", choices=sorted(SIZES), help="default: vit-l on CUDA, small on CPU")
    parser.add_argument("--batches", nargs="+", type=int, help="tower batch sizes; default 1 16 64 (CUDA), 1 4")
    parser.add_argument("--layer-images", nargs="+", type=int, help="layer sizes in images; default 1 16 (CUDA), 1 4")
    parser.add_argument("--train-batch", type=int, help="default 32 (CUDA), 1")
    parser.add_argument("--compile-batches", nargs="+", type=int, help="default 64 (CUDA), 1")
    parser.add_argument("--graph-batches", nargs="+", type=int, default=[1], help="CUDA graph batch sizes")
    parser.add_argument("--compile-dtypes", nargs="+", choices=sorted(DTYPES), help="default: the first of --dtypes")
    parser.add_argument("--compile-backend", default="inductor", help="'eager' only traces (smoke tests)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, help="default: all (CUDA), layer tower train")
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, help="timed runs per measurement; default 10 (CUDA), 3")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before each measurement")
    parser.add_argument("--threads", type=int, help="CPU threads (1 is steadier on a shared machine)")
    return parser.parse_args(argv)


def device_defaults(args: argparse.Namespace, device: torch.device) -> argparse.Namespace:
    """``args`` with the unset options filled in for ``device``."""
    cuda = device.type == "cuda"
    filled = argparse.Namespace(**vars(args))
    defaults = {
        "dtypes": ["bfloat16", "float16"] if cuda else ["float32", "bfloat16"],
        "size": "vit-l" if cuda else "small",
        "batches": [1, 16, 64] if cuda else [1, 4],
        "layer_images": [1, 16] if cuda else [1, 4],
        "train_batch": 32 if cuda else 1,
        "compile_batches": [64] if cuda else [1],
        "sections": list(SECTIONS) if cuda else ["layer", "tower", "train"],
        "repeats": 10 if cuda else 3,
    }
    for name, value in defaults.items():
        if getattr(filled, name) is None:
            setattr(filled, name, value)
    if filled.compile_dtypes is None:
        filled.compile_dtypes = filled.dtypes[:1]
    return filled


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    """Median wall time of ``fn`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def vision_config(size: str, num_experts: int, top_k: int) -> CLIPMoEVisionConfig:
    hidden, intermediate, layers, heads, image = SIZES[size]
    return CLIPMoEVisionConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image,
        patch_size=14,
        hidden_act="quick_gelu",
        num_experts=num_experts,
        top_k=top_k,
    )


def tokens_per_image(config: CLIPMoEVisionConfig) -> int:
    return (config.image_size // config.patch_size) ** 2 + 1


def flop_ratio(config: CLIPMoEVisionConfig) -> float:
    """Multiply-accumulates of the MoE tower over the dense tower (per token, attention included)."""
    d, i, t = config.hidden_size, config.intermediate_size, tokens_per_image(config)
    ffn = 2 * d * i
    dense = 4 * d * d + 2 * t * d + ffn
    return (dense + (config.top_k - 1) * ffn) / dense


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


def mixtral_style_forward(layer: SparseMoE, hidden_states: torch.Tensor):
    """The reference loop of HF Mixtral / the official CLIP-MoE: ``torch.where`` + ``index_add_`` per expert."""
    shape = hidden_states.shape
    tokens = hidden_states.reshape(-1, shape[-1])
    decision = layer.router(tokens)
    out = torch.zeros_like(tokens)
    expert_mask = nn.functional.one_hot(decision.expert_ids, layer.num_experts).permute(2, 1, 0)
    fc1, fc2 = layer.experts.fc1, layer.experts.fc2
    for e in range(layer.num_experts):
        slot, token = torch.where(expert_mask[e])
        hidden = layer.experts.activation_fn(nn.functional.linear(tokens[token], fc1.weight[e], fc1.bias[e]))
        expert_out = nn.functional.linear(hidden, fc2.weight[e], fc2.bias[e])
        out.index_add_(0, token, expert_out * decision.weights[token, slot, None])
    return out.view(shape), decision.logits


@contextlib.contextmanager
def moe_variant(model: nn.Module, variant: str):
    """Run every ``SparseMoE`` of ``model`` with a backend, or with the Mixtral-style forward."""
    layers = [m for m in model.modules() if isinstance(m, SparseMoE)]
    for layer in layers:
        if variant == "mixtral":
            layer.forward = functools.partial(mixtral_style_forward, layer)
        else:
            layer.experts.backend = variant
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
            layer.experts.backend = "auto"


def variant_label(variant: str, model: nn.Module, sample: torch.Tensor) -> str:
    if variant == "mixtral":
        return "Mixtral-style loop"
    if variant != "auto":
        return f"MoE {variant}"
    layer = next(m for m in model.modules() if isinstance(m, SparseMoE))
    resolved = resolve_backend("auto", sample, layer.experts.fc1.out_features, layer.experts.fc1.in_features)
    return f"MoE auto (= {resolved})"


def error_row(columns: int, what: str, error: Exception) -> str:
    message = f"{type(error).__name__}: {error}".splitlines()[0][:100].replace("|", "/")
    return f"| {what} | failed: {message} |" + " |" * (columns - 2)


def build_towers(config: CLIPMoEVisionConfig, device: torch.device, dtype: torch.dtype):
    """A dense and a MoE tower of the same shapes (random weights: timing only)."""
    torch.manual_seed(0)
    dense_config = CLIPMoEVisionConfig(**{**config.to_dict(), "num_experts": 1, "top_k": 1})
    with torch.device(device):
        dense = CLIPMoEVisionModel(dense_config).to(dtype).eval()
        moe = CLIPMoEVisionModel(config).to(dtype).eval()
    return dense, moe


def layer_section(args, device, dtype, config) -> List[str]:
    torch.manual_seed(0)
    d, i = config.hidden_size, config.intermediate_size
    with torch.device(device):
        layer = SparseMoE(d, i, config.num_experts, config.top_k).to(dtype)
        dense = FeedForward(config).to(dtype)
    rows = ["| tokens | backend | MoE ms | floor ms | MoE / floor | naive / MoE |", "|---|---|---|---|---|---|"]
    for images in args.layer_images:
        tokens = torch.randn(images * tokens_per_image(config), d, device=device, dtype=dtype)
        floor_input = tokens.repeat(config.top_k, 1)
        with torch.no_grad():
            t_floor = timed(functools.partial(dense, floor_input), device, args.repeats, args.warmup)
            t_naive = timed(functools.partial(naive_masked_moe, layer, tokens), device, args.repeats, args.warmup)
            for backend in MATMUL_BACKENDS:
                label = resolve_backend(backend, tokens, i, d)
                label = f"auto (= {label})" if backend == "auto" else backend
                try:
                    layer.experts.backend = backend
                    t_moe = timed(functools.partial(layer, tokens), device, args.repeats, args.warmup)
                except RuntimeError as error:
                    rows.append(error_row(6, f"{tokens.shape[0]} {label}", error))
                    continue
                rows.append(
                    f"| {tokens.shape[0]} | {label} | {t_moe * 1e3:.2f} | {t_floor * 1e3:.2f} | "
                    f"{t_moe / t_floor:.2f} | {t_naive / t_moe:.2f} |"
                )
        layer.experts.backend = "auto"
    return rows


TOWER_HEADER = ["| batch | variant | ms | img/s | MoE / dense | FLOP ratio |", "|---|---|---|---|---|---|"]


def tower_row(batch: int, what: str, seconds: float, dense_seconds: Optional[float], ratio: float) -> str:
    relative = f"{seconds / dense_seconds:.2f}" if dense_seconds else ""
    return f"| {batch} | {what} | {seconds * 1e3:.1f} | {batch / seconds:.1f} | {relative} | {ratio:.2f} |"


def tower_section(args, device, dtype, config, dense, moe) -> List[str]:
    rows = list(TOWER_HEADER)
    ratio = flop_ratio(config)
    for batch in args.batches:
        pixels = torch.randn(batch, 3, config.image_size, config.image_size, device=device, dtype=dtype)
        with torch.no_grad():
            t_dense = timed(functools.partial(dense, pixels), device, args.repeats, args.warmup)
            rows.append(tower_row(batch, "dense", t_dense, None, ratio))
            for variant in (*MATMUL_BACKENDS, "mixtral"):
                label = variant_label(variant, moe, pixels)
                try:
                    with moe_variant(moe, variant):
                        seconds = timed(functools.partial(moe, pixels), device, args.repeats, args.warmup)
                except RuntimeError as error:
                    rows.append(error_row(6, f"{batch} {label}", error))
                    continue
                rows.append(tower_row(batch, label, seconds, t_dense, ratio))
    return rows


def captured(model: nn.Module, pixels: torch.Tensor) -> Callable[[], None]:
    """``model(pixels)`` captured in a CUDA graph (warm-up on a side stream first); returns the replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            model(pixels)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(pixels)
    return graph.replay


def graph_section(args, device, dtype, config, dense, moe) -> List[str]:
    rows = list(TOWER_HEADER)
    ratio = flop_ratio(config)
    for batch in args.graph_batches:
        pixels = torch.randn(batch, 3, config.image_size, config.image_size, device=device, dtype=dtype)
        t_dense = None
        for model in (dense, moe):
            label = ("dense" if model is dense else variant_label("auto", moe, pixels)) + ", CUDA graph"
            if label.startswith("MoE auto (= loop)"):
                rows.append(f"| {batch} | {label} | not capturable: the loop backend syncs with the host | | | |")
                continue
            try:
                with torch.no_grad():
                    seconds = timed(captured(model, pixels), device, args.repeats, args.warmup)
            except RuntimeError as error:
                rows.append(error_row(6, f"{batch} {label}", error))
                continue
            rows.append(tower_row(batch, label, seconds, t_dense, ratio))
            t_dense = t_dense or seconds
    return rows


def train_section(args, device, dtype, config) -> List[str]:
    """Forward + backward with fp32 parameters under autocast to ``dtype`` (plain fp32 for float32)."""
    dense, moe = build_towers(config, device, torch.float32)
    dense.train()
    moe.train()
    batch = args.train_batch
    pixels = torch.randn(batch, 3, config.image_size, config.image_size, device=device)
    autocast = dtype != torch.float32

    def step(model):
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            out = model(pixels)
            loss = out.pooler_output.float().square().mean()
            if out.aux_loss is not None:
                loss = loss + 0.01 * out.aux_loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    rows = ["| batch | variant | ms | img/s | MoE / dense | peak memory GiB |", "|---|---|---|---|---|---|"]
    t_dense = None
    for model, variant in [(dense, "auto")] + [(moe, variant) for variant in (*MATMUL_BACKENDS, "mixtral")]:
        label = "dense" if model is dense else variant_label(variant, moe, pixels.to(dtype))
        try:
            with moe_variant(model, variant):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                seconds = timed(functools.partial(step, model), device, args.repeats, args.warmup)
        except RuntimeError as error:
            rows.append(error_row(6, f"{batch} {label}", error))
            continue
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}" if device.type == "cuda" else "n/a"
        relative = f"{seconds / t_dense:.2f}" if t_dense else ""
        t_dense = t_dense or seconds
        rows.append(f"| {batch} | {label} | {seconds * 1e3:.1f} | {batch / seconds:.1f} | {relative} | {peak} |")
    return rows


def compile_section(args, device, dtype, config, dense, moe) -> List[str]:
    """``compile_tower`` (default mode) and, on CUDA, ``mode="reduce-overhead"`` (CUDA graphs)."""
    rows = ["| batch | variant | ms | img/s | MoE / dense | FLOP ratio | compile s |", "|---|---|---|---|---|---|---|"]
    ratio = flop_ratio(config)
    modes = [(None, args.compile_batches)]
    if device.type == "cuda":
        modes.append(("reduce-overhead", args.graph_batches))
    for mode, batches in modes:
        torch._dynamo.reset()
        for model in (dense, moe):
            compile_tower(model, mode=mode, backend=args.compile_backend)
        for batch in batches:
            pixels = torch.randn(batch, 3, config.image_size, config.image_size, device=device, dtype=dtype)
            t_dense = None
            for name, model in (("dense", dense), (variant_label("auto", moe, pixels), moe)):
                label = f"{name}, compiled" + (f" {mode}" if mode else "")
                try:
                    with torch.no_grad():
                        start = time.perf_counter()
                        model(pixels)
                        synchronize(device)
                        compile_seconds = time.perf_counter() - start
                        seconds = timed(functools.partial(model, pixels), device, args.repeats, args.warmup)
                except Exception as error:  # noqa: BLE001 - a compiler failure is a result to report
                    rows.append(error_row(7, f"{batch} {label}", error))
                    continue
                relative = f"{seconds / t_dense:.2f}" if t_dense else ""
                t_dense = t_dense or seconds
                rows.append(
                    f"| {batch} | {label} | {seconds * 1e3:.1f} | {batch / seconds:.1f} | {relative} | "
                    f"{ratio:.2f} | {compile_seconds:.0f} |"
                )
    return rows


def run_device(args: argparse.Namespace, device: torch.device) -> None:
    args = device_defaults(args, device)
    config = vision_config(args.size, args.num_experts, args.top_k)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"\n## {label}: {args.size} (D={config.hidden_size}, I={config.intermediate_size}, "
        f"{config.num_hidden_layers} layers, {tokens_per_image(config)} tokens/image), "
        f"E={config.num_experts} top-{config.top_k}, torch {torch.__version__}",
        flush=True,
    )
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        needs_towers = {"tower", "graph", "compile"} & set(args.sections)
        dense, moe = build_towers(config, device, dtype) if needs_towers else (None, None)
        tables: Dict[str, Callable[[], List[str]]] = {}
        if "layer" in args.sections:
            tables["layer"] = functools.partial(layer_section, args, device, dtype, config)
        if "tower" in args.sections:
            tables["tower, inference, eager"] = functools.partial(
                tower_section, args, device, dtype, config, dense, moe
            )
        if "graph" in args.sections and device.type == "cuda":
            tables["tower, inference, CUDA graph (eager capture)"] = functools.partial(
                graph_section, args, device, dtype, config, dense, moe
            )
        if "train" in args.sections:
            precision = "fp32" if dtype == torch.float32 else f"fp32 weights, {dtype_name} autocast"
            tables[f"tower, training step ({precision})"] = functools.partial(
                train_section, args, device, dtype, config
            )
        if "compile" in args.sections and dtype_name in args.compile_dtypes:
            tables[f"tower, inference, compile_tower (backend {args.compile_backend})"] = functools.partial(
                compile_section, args, device, dtype, config, dense, moe
            )
        for title, table in tables.items():
            start = time.perf_counter()
            rows = table()
            print(f"\n**{label}, {dtype_name}: {title}** ({time.perf_counter() - start:.0f} s)\n", flush=True)
            print("\n".join(rows), flush=True)
        del dense, moe
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or ["cuda" if torch.cuda.is_available() else "cpu"]
    start = time.perf_counter()
    print(f"# MoE benchmark: {' '.join(devices)}; torch {torch.__version__}", flush=True)
    for name in devices:
        if name == "cuda" and not torch.cuda.is_available():
            print("\ncuda: no CUDA device, skipped", flush=True)
            continue
        run_device(args, torch.device(name))
    print(f"\ntotal {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
