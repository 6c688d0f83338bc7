"""Work the MoE forward skips: the aux loss when nobody asks, the one-hot matrix off the grouped path, repeated
device queries, a second normalisation and logit matmul for the loss; and the results stay the same."""

import pytest
import torch
from tiny_models import tiny_clip_moe_config, tiny_siglip_moe_config, tiny_vision_config
from torch._dynamo.testing import CompileCounterWithBackend

from mllm_encoder import (
    CLIPMoEConfig,
    CLIPMoEModel,
    CLIPMoEVisionConfig,
    CLIPMoEVisionModel,
    SiglipMoEConfig,
    SiglipMoEModel,
    layers,
    losses,
)
from mllm_encoder.compile import compile_tower
from mllm_encoder.moe import DispatchPlan, SparseMoE, grouped_mm_available, load_balancing_loss, plan_dispatch
from mllm_encoder.moe import experts as experts_module
from mllm_encoder.moe.experts import resolve_backend
from mllm_encoder.vision_tower import CLIPMoEVisionTower


@pytest.fixture
def aux_calls(monkeypatch):
    """Counts the towers' load-balancing loss computations."""
    calls = []
    original = layers.mean_load_balancing_loss

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(layers, "mean_load_balancing_loss", counted)
    return calls


def clip_inputs(images: int = 3, texts: int = 3, eos_token_id: int = 49407):
    torch.manual_seed(1)
    input_ids = torch.randint(3, 256, (texts, 12))
    input_ids[:, -1] = eos_token_id
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 8:] = 0
    return dict(input_ids=input_ids, pixel_values=torch.randn(images, 3, 32, 32), attention_mask=attention_mask)


def expected_aux(out, attention_mask, text_layers=2):
    """The paper's layer mean over both towers, from the returned router logits."""
    text = [load_balancing_loss(logits, 2, attention_mask) for logits in out.router_logits[:text_layers]]
    vision = [load_balancing_loss(logits, 2) for logits in out.router_logits[text_layers:]]
    return sum(text + vision) / len(out.router_logits)


def test_aux_loss_is_computed_only_when_asked(aux_calls):
    torch.manual_seed(0)
    model = CLIPMoEModel(tiny_clip_moe_config(num_experts=4, top_k=2)).eval()
    inputs = clip_inputs()
    with torch.no_grad():  # inference: nothing asks for it
        plain = model(**inputs)
    assert plain.aux_loss is None and plain.loss is None and not aux_calls
    assert plain.text_model_output.aux_loss is None and plain.vision_model_output.aux_loss is None
    assert len(plain.router_logits) == 5
    as_tuple = model(**inputs, output_aux_loss=False, return_dict=False)  # no loss, no aux loss: 7 fields
    assert len(as_tuple) == 7 and torch.equal(as_tuple[1], plain.logits_per_text)
    trained = model(**inputs)  # autograd records (a training step): computed, as before
    assert len(aux_calls) == 2 and trained.aux_loss.requires_grad
    torch.testing.assert_close(trained.aux_loss, expected_aux(trained, inputs["attention_mask"]))
    with torch.no_grad():
        asked = model(**inputs, output_aux_loss=True)
        with_loss = model(**inputs, return_loss=True, output_aux_loss=False)  # the loss needs it: computed
    torch.testing.assert_close(asked.aux_loss, trained.aux_loss.detach())
    torch.testing.assert_close(with_loss.aux_loss, trained.aux_loss.detach())
    aux_calls.clear()
    assert model(**inputs, output_aux_loss=False).aux_loss is None and not aux_calls
    towers = (model.vision_model(inputs["pixel_values"]), model.text_model(inputs["input_ids"]))
    assert all(tower.aux_loss is not None for tower in towers) and len(aux_calls) == 2


def test_tower_models_follow_the_same_rule(aux_calls):
    torch.manual_seed(0)
    model = CLIPMoEVisionModel(CLIPMoEVisionConfig(**tiny_vision_config(num_experts=4, top_k=2))).train()
    pixels = torch.randn(2, 3, 32, 32)
    out = model(pixels)
    expected = sum(load_balancing_loss(logits, 2) for logits in out.router_logits) / 3
    torch.testing.assert_close(out.aux_loss, expected)
    with torch.no_grad():
        assert model(pixels).aux_loss is None
        torch.testing.assert_close(model(pixels, output_aux_loss=True).aux_loss, expected.detach())
        assert model(pixels, return_dict=False)[-1][0].shape == (2 * 17, 4)  # the tuple ends with the router logits
    assert len(aux_calls) == 2


def test_llava_tower_computes_the_aux_loss_only_when_trainable(tiny_clip_moe_dir, aux_calls):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    args = dict(mm_vision_select_layer=-2, mm_vision_select_feature="patch")
    frozen = CLIPMoEVisionTower("clip-moe", args=type("Args", (), args), source=str(tiny_clip_moe_dir))
    encoder_outputs = []
    frozen.vision_tower.register_forward_hook(lambda module, args, output: encoder_outputs.append(output))
    frozen(images)  # grad mode on, but no trainable weight: nothing to backpropagate into
    frozen(list(images))
    assert len(encoder_outputs) == 3 and all(output.aux_loss is None for output in encoder_outputs)
    assert not aux_calls and not hasattr(frozen, "last_aux_loss")
    trainable = CLIPMoEVisionTower(
        "clip-moe", args=type("Args", (), {**args, "unfreeze_mm_vision_tower": True}), source=str(tiny_clip_moe_dir)
    )
    encoder_outputs.clear()
    trainable.vision_tower.register_forward_hook(lambda module, args, output: encoder_outputs.append(output))
    trainable(images)
    assert len(aux_calls) == 1 and len(encoder_outputs) == 1
    reference = trainable.vision_tower(images, output_hidden_states=True)
    expected = sum(load_balancing_loss(logits, 2) for logits in reference.router_logits) / 2  # the 2 layers built
    torch.testing.assert_close(encoder_outputs[0].aux_loss, expected)  # unweighted, in the encoder's outputs


@pytest.mark.skipif(not grouped_mm_available(), reason="torch has no _grouped_mm")
def test_one_hot_is_built_once_per_layer_and_only_on_the_grouped_path(monkeypatch):
    assert "one_hot" not in DispatchPlan._fields
    torch.manual_seed(0)
    layer = SparseMoE(16, 24, num_experts=4, top_k=2)
    for param in (layer.experts.fc1.bias, layer.experts.fc2.bias):
        torch.nn.init.normal_(param)
    x = torch.randn(2, 5, 16)
    original = DispatchPlan.one_hot
    built = []

    def recorded(plan, dtype):
        built.append(dtype)
        return original(plan, dtype)

    monkeypatch.setattr(DispatchPlan, "one_hot", recorded)
    layer.experts.backend = "loop"
    loop, _ = layer(x)
    assert built == []
    layer.experts.backend = "grouped"
    grouped, _ = layer(x)
    assert built == [torch.float32]
    torch.testing.assert_close(grouped, loop, atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    assert built[-1] == torch.bfloat16  # in the GEMMs' dtype directly: no second cast
    plan = plan_dispatch(torch.tensor([[2, 0], [0, 1], [2, 1]]), num_experts=4)
    assert plan.one_hot(torch.float16).tolist() == [
        [1, 0, 0, 0],
        [1, 0, 0, 0],
        [0, 1, 0, 0],
        [0, 1, 0, 0],
        [0, 0, 1, 0],
        [0, 0, 1, 0],
    ]


@pytest.fixture
def fresh_capability_cache():
    experts_module._cuda_has_grouped_kernel.cache_clear()
    yield
    experts_module._cuda_has_grouped_kernel.cache_clear()


def test_cuda_capability_is_queried_once_per_device(monkeypatch, fresh_capability_cache):
    queried = []
    capabilities = {0: (9, 0), 1: (8, 0)}

    def capability(index):
        queried.append(index)
        return capabilities[index]

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    has_kernel = experts_module._cuda_has_grouped_kernel
    assert [has_kernel(0), has_kernel(0), has_kernel(1), has_kernel(1), has_kernel(0)] == [
        True,
        True,
        False,
        False,
        True,
    ]
    assert queried == [0, 1]


def test_cpu_backend_choice_never_queries_cuda(monkeypatch, fresh_capability_cache):
    def refuse(*args):
        raise AssertionError("a CPU tensor must not query the CUDA capability")

    monkeypatch.setattr(torch.cuda, "get_device_capability", refuse)
    x = torch.zeros(2, 16, dtype=torch.bfloat16)
    assert resolve_backend("auto", x, 24, 16) == ("grouped" if grouped_mm_available() else "loop")
    assert resolve_backend("auto", x, 24, 16, dtype=torch.float16) == "loop"  # the caller's compute dtype


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_model_loss_is_the_distributed_loss_computed_once_from_the_logits(family, monkeypatch):
    """The model's loss comes from the logits it returns (no second normalisation and matmul) and equals the
    trainer's loss of the embeddings plus the weighted aux loss."""
    torch.manual_seed(0)
    if family == "clip":
        model = CLIPMoEModel(tiny_clip_moe_config(num_experts=4, top_k=2)).eval()
    else:
        model = SiglipMoEModel(tiny_siglip_moe_config()).eval()
    inputs = clip_inputs(eos_token_id=49407 if family == "clip" else 2)
    gathered = []
    original = losses._normalise_and_gather
    monkeypatch.setattr(losses, "_normalise_and_gather", lambda *a: gathered.append(1) or original(*a))
    out = model(**inputs, return_loss=True)
    assert not gathered
    image, text = out.image_embeds, out.text_embeds
    if family == "clip":
        contrastive = losses.clip_contrastive_loss(image, text, model.logit_scale.exp())
    else:
        contrastive = losses.siglip_sigmoid_loss(image, text, model.logit_scale.exp(), model.logit_bias)
    torch.testing.assert_close(out.loss, contrastive + 0.01 * out.aux_loss)
    torch.testing.assert_close(out.logits_per_image, out.logits_per_text.t())
    (grad,) = torch.autograd.grad(out.loss, model.logit_scale)
    (expected_grad,) = torch.autograd.grad(contrastive, model.logit_scale)
    torch.testing.assert_close(grad, expected_grad)


def test_loss_needs_as_many_texts_as_images():
    torch.manual_seed(0)
    model = CLIPMoEModel(tiny_clip_moe_config(num_experts=4, top_k=2)).eval()
    with torch.no_grad():
        out = model(**clip_inputs(images=2, texts=3))  # scoring without a loss: any counts
        assert out.logits_per_text.shape == (3, 2)
        with pytest.raises(ValueError, match="as many texts as images"):
            model(**clip_inputs(images=2, texts=3), return_loss=True)


def test_low_precision_logits_are_computed_in_float32_then_cast():
    torch.manual_seed(0)
    model = CLIPMoEModel(tiny_clip_moe_config(num_experts=4, top_k=2)).eval()
    inputs = clip_inputs()
    with torch.no_grad():
        reference = model(**inputs, return_loss=True)
        half = model.bfloat16()(**inputs, return_loss=True)
    assert half.logits_per_text.dtype == half.text_embeds.dtype == torch.bfloat16
    assert half.loss.dtype == torch.float32
    torch.testing.assert_close(half.logits_per_text.float(), reference.logits_per_text, atol=0.5, rtol=0.02)
    torch.testing.assert_close(half.loss, reference.loss, atol=0.05, rtol=0.02)


def test_autocast_over_float32_weights_keeps_float32_embeddings_and_logits():
    torch.manual_seed(0)
    model = CLIPMoEModel(tiny_clip_moe_config(num_experts=4, top_k=2)).eval()
    inputs = clip_inputs()
    with torch.no_grad():
        reference = model(**inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(**inputs)
    assert mixed.router_logits[0].dtype == torch.bfloat16  # the towers did run in bf16
    for name in ("logits_per_text", "logits_per_image", "text_embeds", "image_embeds"):
        assert getattr(mixed, name).dtype == torch.float32, name  # not rounded back to bf16 (HF CLIP's rule)
    scale = model.logit_scale.exp().item()
    difference = (mixed.logits_per_text - reference.logits_per_text).abs()
    assert 0 < difference.max() < 0.05 * scale and bool((difference % 0.25 != 0).any())  # not on a bf16 grid


def test_clip_image_tower_refuses_naflex_inputs():
    model = CLIPMoEVisionModel(CLIPMoEVisionConfig(**tiny_vision_config()))
    with pytest.raises(ValueError, match="NaFlex"):
        model(torch.randn(1, 3, 32, 32), spatial_shapes=torch.tensor([[4, 4]]))


def test_two_tower_initializer_factor_is_one_in_both_families():
    for config_class in (CLIPMoEConfig, SiglipMoEConfig):
        config = config_class(initializer_factor=3.0)
        assert config.initializer_factor == 1.0, config_class.__name__
        assert config_class.from_dict(config.to_dict()).initializer_factor == 1.0


@pytest.mark.skipif(not grouped_mm_available(), reason="torch has no _grouped_mm")
def test_inference_tower_traces_as_one_graph_without_the_aux_loss():
    torch.manual_seed(0)
    config = CLIPMoEVisionConfig(**tiny_vision_config(num_experts=4, top_k=2, num_hidden_layers=2))
    model = CLIPMoEVisionModel(config).bfloat16()
    pixels = torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            eager = model(pixels)
            counter = CompileCounterWithBackend("eager")
            compiled = compile_tower(model, backend=counter)(pixels)
        assert counter.frame_count == 1 and compiled.aux_loss is None
        torch.testing.assert_close(compiled.last_hidden_state, eager.last_hidden_state)
    finally:
        torch._dynamo.reset()
