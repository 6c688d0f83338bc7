"""CUDA paths of the MoE layer (run with a GPU: ``pytest -m gpu``)."""

import pytest
import torch

from mllm_encoder.moe import SparseMoE, grouped_mm_available
from mllm_encoder.moe.experts import resolve_backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_auto_picks_grouped_gemm_for_cuda_bf16():
    x = torch.zeros(4, 64, device="cuda", dtype=torch.bfloat16)
    expected = "grouped" if grouped_mm_available() else "loop"
    assert resolve_backend("auto", x, 64, 256) == expected
    assert resolve_backend("auto", x.float(), 64, 256) == "loop"


@pytest.mark.skipif(not grouped_mm_available(), reason="torch has no grouped GEMM")
def test_grouped_gemm_matches_the_loop_forward_and_backward():
    torch.manual_seed(0)
    layer = SparseMoE(256, 1024, num_experts=4, top_k=2).cuda().to(torch.bfloat16)
    x = torch.randn(2, 577, 256, device="cuda", dtype=torch.bfloat16)
    outputs, grads = {}, {}
    for backend in ("grouped", "loop"):
        layer.zero_grad()
        layer.experts.backend = backend
        out, _ = layer(x)
        out.float().square().mean().backward()
        outputs[backend] = out.float()
        grads[backend] = layer.experts.fc1.weight.grad.float().clone()
    torch.testing.assert_close(outputs["grouped"], outputs["loop"], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(grads["grouped"], grads["loop"], atol=2e-2, rtol=5e-2)
