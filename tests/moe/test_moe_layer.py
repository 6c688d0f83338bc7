"""SparseMoE against a naive per-expert masked loop; dispatch; load-balancing loss."""

import pytest
import torch

from mllm_encoder.moe import SparseMoE, gather_tokens, grouped_mm_available, load_balancing_loss, plan_dispatch
from mllm_encoder.moe.experts import resolve_backend

E, D, H = 4, 16, 24


def naive_moe(layer: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, masked by the router's choice: the textbook definition."""
    tokens = x.reshape(-1, x.shape[-1])
    probs = torch.softmax(tokens @ layer.router.weight.t(), dim=-1, dtype=torch.float32)
    weights, chosen = probs.topk(layer.top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    out = torch.zeros_like(tokens)
    fc1, fc2 = layer.experts.fc1, layer.experts.fc2
    for e in range(layer.num_experts):
        hidden = layer.experts.activation_fn(tokens @ fc1.weight[e].t() + fc1.bias[e])
        expert_out = hidden @ fc2.weight[e].t() + fc2.bias[e]
        gate = (weights * (chosen == e)).sum(-1, keepdim=True).to(tokens.dtype)
        out = out + gate * expert_out
    return out.view(x.shape)


def make_layer(seed: int = 0, top_k: int = 2, starve_last_expert: bool = True):
    torch.manual_seed(seed)
    layer = SparseMoE(D, H, E, top_k)
    for param in (layer.experts.fc1.bias, layer.experts.fc2.bias):
        torch.nn.init.normal_(param)
    x = torch.randn(3, 7, D)
    if starve_last_expert:
        x[..., 0] = 1.0
        with torch.no_grad():
            layer.router.weight[E - 1, 0] = -1e4
    return layer, x


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("backend", ["loop", "grouped", "grouped-compiled-form"])
def test_sparse_moe_matches_naive_loop_forward_and_backward(top_k, backend, monkeypatch):
    """Every kernel path, fp32 on CPU, incl. the form traced under torch.compile (bias as an indexed load)."""
    if backend != "loop" and not grouped_mm_available():
        pytest.skip("torch has no _grouped_mm")
    if backend == "grouped-compiled-form":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    layer, x = make_layer(top_k=top_k)
    layer.experts.backend = backend.split("-")[0]
    x_ours = x.clone().requires_grad_(True)
    x_ref = x.clone().requires_grad_(True)
    out, router_logits = layer(x_ours)
    assert router_logits.shape == (21, E)
    ref = naive_moe(layer, x_ref)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)

    grad = torch.randn_like(out)
    ours_grads = torch.autograd.grad(out, [x_ours, *layer.parameters()], grad)
    ref_grads = torch.autograd.grad(ref, [x_ref, *layer.parameters()], grad)
    for ours_grad, ref_grad in zip(ours_grads, ref_grads):
        torch.testing.assert_close(ours_grad, ref_grad, atol=1e-5, rtol=1e-5)
    names = [name for name, _ in layer.named_parameters()]
    fc1_grad = ours_grads[1 + names.index("experts.fc1.weight")]
    assert torch.count_nonzero(fc1_grad[E - 1]) == 0, "an expert that got no token has no gradient"


def test_expert_with_no_tokens_is_really_starved():
    layer, x = make_layer()
    plan = plan_dispatch(layer.router(x.reshape(-1, D)).expert_ids, E)
    assert plan.counts[E - 1] == 0
    assert int(plan.counts.sum()) == 21 * 2


def test_plan_dispatch_groups_slots_by_expert_stably():
    expert_ids = torch.tensor([[2, 0], [0, 1], [2, 1]])
    plan = plan_dispatch(expert_ids, num_experts=4)
    assert plan.expert_ids.tolist() == [0, 0, 1, 1, 2, 2]
    assert plan.token_index.tolist() == [0, 1, 1, 2, 0, 2]
    assert plan.counts.tolist() == [2, 2, 2, 0]
    assert plan.offsets.tolist() == [2, 4, 6, 6]
    flat = expert_ids.reshape(-1)
    assert torch.equal(plan.expert_ids[plan.inverse], flat)


@pytest.mark.parametrize("hidden_act", ["gelu", "relu"])
def test_activations_other_than_quick_gelu_match_the_naive_loop(hidden_act):
    """QuickGELU is folded into the GEMMs as silu(1.702 x) / 1.702; the other activations run as they are."""
    layer, x = make_layer()
    layer.experts = type(layer.experts)(E, D, H, hidden_act)
    for param in (layer.experts.fc1.bias, layer.experts.fc2.bias):
        torch.nn.init.normal_(param)
    for backend in ("loop", "grouped"):
        layer.experts.backend = backend
        torch.testing.assert_close(layer(x)[0], naive_moe(layer, x), atol=1e-5, rtol=1e-5)


def test_grouped_under_cpu_autocast_runs_the_gemms_in_bf16():
    """Autocast does not cover torch._grouped_mm: the experts cast to autocast's dtype themselves."""
    layer, x = make_layer(starve_last_expert=False)
    reference = naive_moe(layer, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert resolve_backend("auto", x, H, D) == "grouped"
        out, _ = layer(x)
    assert resolve_backend("auto", x, H, D) == "loop"
    torch.testing.assert_close(out.float(), reference, atol=0.05, rtol=0.05)


def test_auto_backend_table_on_cpu():
    x = torch.zeros(2, D)
    assert resolve_backend("auto", x, H, D) == "loop"
    expected = "grouped" if grouped_mm_available() else "loop"
    assert resolve_backend("auto", x.bfloat16(), H, D) == expected
    assert resolve_backend("auto", x.half(), H, D) == "loop"
    assert resolve_backend("loop", x.bfloat16(), H, D) == "loop"
    with pytest.raises(ValueError, match="dispatch backend"):
        resolve_backend("triton", x, H, D)


def test_gathered_tokens_backward_sums_the_k_slots():
    """gather_tokens' custom backward (a gather by the inverse permutation + a sum) equals index_select's."""
    torch.manual_seed(0)
    tokens = torch.randn(5, 3, requires_grad=True)
    plan = plan_dispatch(torch.tensor([[2, 0, 1], [1, 0, 3], [3, 2, 0], [0, 1, 2], [2, 3, 1]]), num_experts=4)
    grad = torch.randn(15, 3)
    (ours,) = torch.autograd.grad(gather_tokens(tokens, plan), tokens, grad)
    (reference,) = torch.autograd.grad(tokens.index_select(0, plan.token_index), tokens, grad)
    torch.testing.assert_close(ours, reference)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparse_moe_low_precision_close_to_fp32(dtype):
    layer, x = make_layer(starve_last_expert=False)
    reference, _ = layer(x)
    out, logits = layer.to(dtype)(x.to(dtype))
    assert out.dtype == dtype and logits.dtype == dtype
    torch.testing.assert_close(out.float(), reference, atol=0.05, rtol=0.05)


def test_load_balancing_loss_values():
    uniform = torch.zeros(8, 4)
    assert load_balancing_loss(uniform, top_k=2).item() == pytest.approx(1.0)
    # Every token prefers expert 0 then 1: f = [1/2, 1/2, 0, 0]; P_0 = P_1 = mean softmax.
    logits = torch.tensor([[3.0, 2.0, 0.0, 0.0]]).repeat(5, 1)
    probs = torch.softmax(logits[0], -1)
    expected = 4 * (0.5 * probs[0] + 0.5 * probs[1])
    assert load_balancing_loss(logits, top_k=2).item() == pytest.approx(expected.item(), rel=1e-6)


def test_load_balancing_loss_ignores_masked_tokens():
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0], [0.0, 5.0]])
    mask = torch.tensor([1, 1, 0])
    balanced = load_balancing_loss(logits[:2], top_k=1)
    assert load_balancing_loss(logits, top_k=1, token_mask=mask).item() == pytest.approx(balanced.item())
    assert load_balancing_loss(logits, top_k=1).item() != pytest.approx(balanced.item())


def test_router_rejects_top_k_above_num_experts():
    with pytest.raises(ValueError, match="top_k"):
        SparseMoE(D, H, num_experts=2, top_k=3)


@pytest.mark.parametrize("backend", ["loop", "grouped"])
def test_each_expert_linear_is_entered_once_through_its_module_call(backend):
    """DeepSpeed ZeRO-3 gathers a module's parameters in its forward hooks: the stacked expert weights must
    be used only inside ``fc1(...)`` / ``fc2(...)`` calls, once per layer whatever the routing."""
    if backend == "grouped" and not grouped_mm_available():
        pytest.skip("torch has no _grouped_mm")
    layer, x = make_layer()
    layer.experts.backend = backend
    calls = []
    for name in ("fc1", "fc2"):
        getattr(layer.experts, name).register_forward_pre_hook(lambda module, args, name=name: calls.append(name))
    layer(x)
    assert calls == ["fc1", "fc2"]
