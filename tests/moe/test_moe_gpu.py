"""CUDA paths of the MoE layer (run with a GPU: ``pytest -m gpu``)."""

import pytest
import torch
from tiny_models import tiny_vision_config

from mllm_encoder import CLIPMoEVisionConfig, CLIPMoEVisionModel
from mllm_encoder.compile import compile_tower
from mllm_encoder.moe import SparseMoE, grouped_mm_available
from mllm_encoder.moe.experts import resolve_backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def fused_grouped_kernel() -> bool:
    """torch's bf16 grouped GEMM kernel: sm90 / sm100."""
    cuda = torch.cuda.is_available() and grouped_mm_available()
    return cuda and torch.cuda.get_device_capability()[0] in (9, 10)


needs_fused_grouped_kernel = pytest.mark.skipif(not fused_grouped_kernel(), reason="needs bf16 grouped GEMM (sm90+)")


def make_layer(dtype=torch.bfloat16):
    torch.manual_seed(0)
    layer = SparseMoE(256, 1024, num_experts=4, top_k=2).cuda().to(dtype)
    for param in (layer.experts.fc1.bias, layer.experts.fc2.bias):
        torch.nn.init.normal_(param, std=0.1)
    return layer


def test_auto_backend_table_on_cuda():
    x = torch.zeros(4, 64, device="cuda", dtype=torch.bfloat16)
    assert resolve_backend("auto", x, 64, 256) == ("grouped" if fused_grouped_kernel() else "loop")
    assert resolve_backend("auto", x, 60, 256) == "loop", "widths that are not multiples of 8"
    assert resolve_backend("auto", x.half(), 64, 256) == "loop"
    assert resolve_backend("auto", x.float(), 64, 256) == "loop"
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert resolve_backend("auto", x.float(), 64, 256) == ("grouped" if fused_grouped_kernel() else "loop")


@pytest.mark.skipif(not grouped_mm_available(), reason="torch has no grouped GEMM")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grouped_gemm_matches_the_loop_forward_and_backward(dtype):
    layer = make_layer(dtype)
    x = torch.randn(2, 577, 256, device="cuda", dtype=dtype)
    outputs, grads = {}, {}
    for backend in ("grouped", "loop"):
        layer.zero_grad()
        layer.experts.backend = backend
        out, _ = layer(x)
        out.float().square().mean().backward()
        outputs[backend] = out.float()
        grads[backend] = [p.grad.float().clone() for p in (layer.experts.fc1.weight, layer.experts.fc2.bias)]
    torch.testing.assert_close(outputs["grouped"], outputs["loop"], atol=2e-2, rtol=2e-2)
    for grouped, loop in zip(grads["grouped"], grads["loop"]):
        torch.testing.assert_close(grouped, loop, atol=2e-2, rtol=5e-2)


@needs_fused_grouped_kernel
def test_grouped_path_never_syncs_and_is_deterministic():
    layer = make_layer()
    x = torch.randn(3, 577, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer(x)  # warm-up (cuBLAS / CUTLASS initialisation may sync once)
    torch.cuda.set_sync_debug_mode("error")
    try:
        results = []
        for _ in range(2):
            layer.zero_grad()
            x.grad = None
            out, _ = layer(x)
            out.float().square().mean().backward()
            results.append([out, x.grad, layer.experts.fc1.weight.grad, layer.experts.fc1.bias.grad])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for first, second in zip(*results):
        assert torch.equal(first, second)


@needs_fused_grouped_kernel
def test_tower_is_captured_by_a_cuda_graph():
    torch.manual_seed(0)
    config = CLIPMoEVisionConfig(**tiny_vision_config(num_experts=4, top_k=2))
    model = CLIPMoEVisionModel(config).cuda().bfloat16().eval()
    pixels = torch.randn(2, 3, 32, 32, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        expected = model(pixels).last_hidden_state
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            model(pixels)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = model(pixels).last_hidden_state
        pixels.copy_(torch.randn_like(pixels))
        graph.replay()
        torch.testing.assert_close(captured, model(pixels).last_hidden_state)
        assert not torch.equal(captured, expected)


@needs_fused_grouped_kernel
def test_compile_tower_reduce_overhead_matches_eager():
    torch.manual_seed(0)
    torch._dynamo.reset()
    config = CLIPMoEVisionConfig(**tiny_vision_config(num_experts=4, top_k=2))
    model = CLIPMoEVisionModel(config).cuda().bfloat16().eval()
    pixels = torch.randn(2, 3, 32, 32, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        expected = model(pixels).last_hidden_state
        compile_tower(model, mode="reduce-overhead")
        for _ in range(3):
            out = model(pixels).last_hidden_state.clone()
    torch.testing.assert_close(out, expected, atol=3e-2, rtol=3e-2)
