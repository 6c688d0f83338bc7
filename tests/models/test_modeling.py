"""Our towers equal HF CLIP on the same weights; outputs, losses, configs, gradient checkpointing."""

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_clip_moe_config, tiny_text_config, tiny_vision_config
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from mllm_encoder import CLIPMoEConfig, CLIPMoEModel, CLIPMoEVisionConfig, CLIPMoEVisionModel
from mllm_encoder.moe import load_balancing_loss

ATOL = 1e-5


def hf_and_ours(seed: int = 0, **text_overrides):
    torch.manual_seed(seed)
    config = CLIPConfig(
        vision_config=tiny_vision_config(), text_config=tiny_text_config(**text_overrides), projection_dim=16
    )
    hf = CLIPModel(config).eval()
    ours = CLIPMoEModel(CLIPMoEConfig.from_dict(config.to_dict())).eval()
    ours.load_state_dict(hf.state_dict(), strict=False)
    return hf, ours


def text_inputs(eos_token_id: int = 49407):
    torch.manual_seed(3)
    input_ids = torch.randint(1, 40000, (3, 12))
    input_ids[:, 0] = 49406
    input_ids[0, 11] = eos_token_id
    input_ids[1, 6] = eos_token_id
    input_ids[2, 9] = eos_token_id
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    attention_mask[2, 10:] = 0
    return input_ids, attention_mask


def assert_states_close(expected, actual):
    assert len(expected) == len(actual)
    for index, (e, a) in enumerate(zip(expected, actual)):
        torch.testing.assert_close(a, e, atol=ATOL, rtol=0, msg=lambda m, i=index: f"hidden_states[{i}]: {m}")


@pytest.mark.parametrize("eos_token_id", [49407, 2])
def test_dense_clip_moe_model_equals_hf_clip(eos_token_id):
    hf, ours = hf_and_ours(eos_token_id=eos_token_id)
    input_ids, attention_mask = text_inputs(49407)
    pixel_values = torch.randn(3, 3, 32, 32)
    kwargs = dict(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, return_loss=True)
    with torch.no_grad():
        expected = hf(**kwargs, output_hidden_states=True)
        actual = ours(**kwargs, output_hidden_states=True)
    torch.testing.assert_close(actual.logits_per_image, expected.logits_per_image, atol=ATOL, rtol=0)
    torch.testing.assert_close(actual.text_embeds, expected.text_embeds, atol=ATOL, rtol=0)
    torch.testing.assert_close(actual.image_embeds, expected.image_embeds, atol=ATOL, rtol=0)
    with torch.no_grad():  # HF 5.x projects the nested pooler outputs, so compare with the towers directly
        hf_text = hf.text_model(input_ids, attention_mask, output_hidden_states=True)
        hf_vision = hf.vision_model(pixel_values, output_hidden_states=True)
    for ours_tower, hf_tower in (
        (actual.text_model_output, hf_text),
        (actual.vision_model_output, hf_vision),
    ):
        torch.testing.assert_close(ours_tower.last_hidden_state, hf_tower.last_hidden_state, atol=ATOL, rtol=0)
        torch.testing.assert_close(ours_tower.pooler_output, hf_tower.pooler_output, atol=ATOL, rtol=0)
        assert_states_close(hf_tower.hidden_states, ours_tower.hidden_states)
    assert actual.aux_loss.item() == 0.0
    torch.testing.assert_close(actual.loss, expected.loss, atol=ATOL, rtol=0)


def test_projected_features_equal_hf():
    hf, ours = hf_and_ours()
    input_ids, attention_mask = text_inputs()
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        image = hf.visual_projection(hf.vision_model(pixel_values).pooler_output)
        text = hf.text_projection(hf.text_model(input_ids, attention_mask).pooler_output)
        torch.testing.assert_close(ours.get_image_features(pixel_values), image, atol=ATOL, rtol=0)
        torch.testing.assert_close(ours.get_text_features(input_ids, attention_mask), text, atol=ATOL, rtol=0)


def test_dense_vision_model_equals_hf_clip_vision_model():
    torch.manual_seed(0)
    hf = CLIPVisionModel(CLIPVisionConfig(**tiny_vision_config())).eval()
    ours = CLIPMoEVisionModel(CLIPMoEVisionConfig(**tiny_vision_config())).eval()
    state = hf.state_dict()
    if not any(k.startswith("vision_model.") for k in state):
        state = {"vision_model." + k: v for k, v in state.items()}
    ours.load_state_dict(state, strict=False)
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = hf(pixel_values, output_hidden_states=True)
        actual = ours(pixel_values, output_hidden_states=True)
    assert len(actual.hidden_states) == 4, "embeddings + one state per layer"
    assert_states_close(expected.hidden_states, actual.hidden_states)
    torch.testing.assert_close(actual.pooler_output, expected.pooler_output, atol=ATOL, rtol=0)
    torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state, atol=ATOL, rtol=0)


def test_a_config_with_fewer_layers_stops_early_and_matches_the_full_run():
    model = CLIPMoEVisionModel(CLIPMoEVisionConfig(**tiny_vision_config(num_experts=4, top_k=2))).eval()
    short = CLIPMoEVisionModel(CLIPMoEVisionConfig(**tiny_vision_config(num_experts=4, top_k=2, num_hidden_layers=2)))
    result = short.eval().load_state_dict(model.state_dict(), strict=False)
    assert not result.missing_keys and all(".layers.2." in key for key in result.unexpected_keys)
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = model(pixel_values, output_hidden_states=True)
        partial = short(pixel_values, output_hidden_states=True)
    assert len(partial.hidden_states) == 3 and len(partial.router_logits) == 2
    torch.testing.assert_close(partial.hidden_states[-1], full.hidden_states[-2])


def test_moe_model_outputs_aux_loss_and_router_logits():
    torch.manual_seed(0)
    model = CLIPMoEModel(tiny_clip_moe_config(num_experts=4, top_k=2)).eval()
    input_ids, attention_mask = text_inputs()
    pixel_values = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, return_loss=True)
    assert len(out.router_logits) == 2 + 3
    assert out.router_logits[0].shape == (3 * 12, 4) and out.router_logits[-1].shape == (3 * 17, 4)
    text_aux, vision_aux = out.text_model_output.aux_loss, out.vision_model_output.aux_loss
    text_layers = [load_balancing_loss(logits, 2, attention_mask) for logits in out.router_logits[:2]]
    vision_layers = [load_balancing_loss(logits, 2) for logits in out.router_logits[2:]]
    torch.testing.assert_close(text_aux, sum(text_layers) / 2)  # a tower's aux loss: its layer mean
    torch.testing.assert_close(vision_aux, sum(vision_layers) / 3)
    torch.testing.assert_close(out.aux_loss, sum(text_layers + vision_layers) / 5)  # mean over both towers
    per_text = out.logits_per_text
    targets = torch.arange(3)
    contrastive = (F.cross_entropy(per_text, targets) + F.cross_entropy(per_text.t(), targets)) / 2
    expected = contrastive + 0.01 * out.aux_loss
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("text_layers,vision_layers", [(1, 1), (2, 3), (6, 12)])
def test_aux_loss_is_one_under_uniform_routing_whatever_the_depth(text_layers, vision_layers):
    moe = dict(num_experts=4, top_k=2)
    config = CLIPMoEConfig(
        vision_config=tiny_vision_config(num_hidden_layers=vision_layers, **moe),
        text_config=tiny_text_config(num_hidden_layers=text_layers, **moe),
        projection_dim=16,
    )
    model = CLIPMoEModel(config).eval()
    for name, param in model.named_parameters():
        if ".router." in name:
            torch.nn.init.zeros_(param)  # equal logits: every expert has probability 1/4
    input_ids, attention_mask = text_inputs()
    with torch.no_grad():
        out = model(
            input_ids=input_ids,
            pixel_values=torch.randn(3, 3, 32, 32),
            attention_mask=attention_mask,
            output_aux_loss=True,
        )
    assert len(out.router_logits) == text_layers + vision_layers
    for aux in (out.aux_loss, out.text_model_output.aux_loss, out.vision_model_output.aux_loss):
        assert aux.item() == pytest.approx(1.0, abs=1e-6)


def test_text_aux_loss_counts_only_real_tokens():
    torch.manual_seed(0)
    model = CLIPMoEModel(tiny_clip_moe_config()).eval()
    input_ids, attention_mask = text_inputs()
    with torch.no_grad():
        masked = model.text_model(input_ids, attention_mask, output_aux_loss=True).aux_loss
        unmasked = model.text_model(input_ids, None, output_aux_loss=True).aux_loss
        lengths = attention_mask.sum(1).tolist()
        per_sequence = [model.text_model(input_ids[i : i + 1, :n]).router_logits for i, n in enumerate(lengths)]
    real_token_logits = [torch.cat(layer) for layer in zip(*per_sequence)]
    expected = sum(load_balancing_loss(logits, top_k=2) for logits in real_token_logits) / len(real_token_logits)
    torch.testing.assert_close(masked, expected)
    assert abs(masked.item() - unmasked.item()) > 1e-4


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = CLIPMoEModel(tiny_clip_moe_config())
    input_ids, attention_mask = text_inputs()
    pixel_values = torch.randn(3, 3, 32, 32)

    layers = [*model.vision_model.encoder.layers, *model.text_model.encoder.layers]
    calls = []
    for layer in layers:
        layer.register_forward_pre_hook(lambda module, args: calls.append(module))  # recomputation may stop early

    def gradients():
        model.zero_grad()
        calls.clear()
        model(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, return_loss=True
        ).loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    model.train()
    plain = gradients()
    assert len(calls) == len(layers)  # each layer runs once
    model.gradient_checkpointing_enable()
    assert model.vision_model.encoder.gradient_checkpointing
    checkpointed = gradients()
    assert len(calls) == 2 * len(layers) and set(calls) == set(layers)  # every layer recomputed in backward
    assert sum(int(grad.abs().sum() > 0) for grad in plain) > len(plain) // 2  # a real comparison, not of zeros
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(num_experts=2, top_k=3), "top_k"),
        (dict(num_experts=4, top_k=2, moe_layers=[0, 3]), "moe_layers"),
        (dict(num_experts=4, top_k=2, moe_layers=[1, 1]), "moe_layers"),
        (dict(num_experts=0), "num_experts"),
        (dict(num_attention_heads=5), "num_attention_heads"),
    ],
)
def test_invalid_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        CLIPMoEVisionConfig(**tiny_vision_config(**overrides))


def test_moe_layers_subset_and_dense_towers():
    config = CLIPMoEVisionConfig(**tiny_vision_config(num_experts=4, top_k=2, moe_layers=[2, 1]))
    assert config.moe_layers == [1, 2] and config.moe_layer_indices == [1, 2]
    model = CLIPMoEVisionModel(config)
    assert hasattr(model.vision_model.encoder.layers[0].mlp, "fc1")
    assert model.vision_model.encoder.layers[1].mlp.experts.fc1.weight.shape == (4, 64, 32)
    assert CLIPMoEVisionConfig(**tiny_vision_config(num_experts=4, top_k=2, moe_layers=[])).moe_layer_indices == []
    assert CLIPMoEVisionConfig(**tiny_vision_config()).moe_layer_indices == []


def test_each_towers_coefficient_weighs_its_own_layers():
    moe = dict(num_experts=4, top_k=2)
    config = CLIPMoEConfig(
        vision_config=tiny_vision_config(router_aux_loss_coef=0.1, **moe),
        text_config=tiny_text_config(router_aux_loss_coef=0.0, **moe),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPMoEModel(config).eval()
    input_ids, attention_mask = text_inputs()
    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=torch.randn(3, 3, 32, 32), attention_mask=attention_mask,
                    return_loss=True)  # fmt: skip
    targets = torch.arange(3)
    contrastive = (F.cross_entropy(out.logits_per_text, targets) + F.cross_entropy(out.logits_per_image, targets)) / 2
    vision_aux = out.vision_model_output.aux_loss  # 3 vision MoE layers of 5; the text tower's weight is 0
    torch.testing.assert_close(out.loss, contrastive + 0.1 * 3 * vision_aux / 5)
