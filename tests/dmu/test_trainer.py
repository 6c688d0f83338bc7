"""The training loop: trainable selection, schedule, and exact resume after an injected stop."""

import pytest
import torch
from dmu_helpers import collate
from transformers import CLIPConfig, CLIPModel

from mllm_encoder.dmu.accelerator import build_accelerator
from mllm_encoder.dmu.config import RuntimeSection, StageSection
from mllm_encoder.dmu.run_state import latest_training_state, load_training_state, save_training_state
from mllm_encoder.dmu.trainer import (
    TrainConfig,
    TrainingInterrupted,
    build_optimizer,
    learning_rate,
    select_trainable,
    train,
)


def _tiny_clip(seed=0):
    torch.manual_seed(seed)
    common = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(vocab_size=64, max_position_embeddings=8, eos_token_id=63, **common),
        vision_config=dict(image_size=16, patch_size=8, **common),
        projection_dim=16,
    )
    return CLIPModel(config)


@torch.no_grad()
def _loss_on(model, pairs) -> float:
    """The model's mean CLIP loss over ``pairs`` in fixed batches of 4, in eval mode."""
    model.eval()
    batches = [collate([pairs[i] for i in range(start, start + 4)]) for start in range(0, len(pairs), 4)]
    return sum(
        model(**{k: b[k] for k in ("input_ids", "pixel_values", "attention_mask")}, return_loss=True).loss.item()
        for b in batches
    ) / len(batches)


def _cfg(steps=6, **overrides):
    stage = dict(batch_size=4, grad_accum=2, lr=1e-3, weight_decay=0.2, warmup_steps=2)
    return TrainConfig(StageSection(**{**stage, **overrides}), steps, runtime=RuntimeSection(save_every=2, log_every=1))


def test_select_trainable_ffn_only():
    model = _tiny_clip()
    params = select_trainable(model, "ffn")
    assert params and all(".mlp." in name for name in params)
    assert not any(p.requires_grad for name, p in model.named_parameters() if ".mlp." not in name)


def test_select_trainable_ffn_excludes_routers():
    from tiny_models import tiny_clip_moe_config

    from mllm_encoder import CLIPMoEModel

    model = CLIPMoEModel(tiny_clip_moe_config())
    ffn = select_trainable(model, "ffn")
    assert ffn and not any(".router." in name for name in ffn)
    routers = select_trainable(model, "router")
    assert routers and all(".router." in name for name in routers)
    assert set(select_trainable(model, "ffn+router")) == set(ffn) | set(routers)


def test_optimizer_defaults_are_the_official_recipe():
    params = select_trainable(_tiny_clip(), "ffn")
    optimizer = build_optimizer(params, StageSection())
    (group,) = optimizer.param_groups  # weight decay on every trainable tensor, biases included
    assert (group["betas"], group["eps"], group["weight_decay"], group["lr"]) == ((0.9, 0.999), 1e-8, 0.2, 1e-5)
    assert len(group["params"]) == len(params)
    split = build_optimizer(params, StageSection(decay_norms_and_biases=False)).param_groups
    assert [g["weight_decay"] for g in split] == [0.2, 0.0]
    assert all(p.ndim >= 2 for p in split[0]["params"]) and all(p.ndim == 1 for p in split[1]["params"])


def test_schedule_warmup_then_cosine():
    cfg = _cfg(steps=10, warmup_steps=2, lr=1.0)
    rates = [learning_rate(s, cfg) for s in range(10)]
    assert rates[:3] == [0.5, 1.0, 1.0]
    assert all(a >= b for a, b in zip(rates[2:], rates[3:])) and rates[-1] < 0.05


def test_resume_after_injected_stop_matches_uninterrupted_run(tmp_path, pairs):
    labels = [i % 3 for i in range(len(pairs))]
    accelerator = build_accelerator("no")
    reference = _tiny_clip()
    history = train(reference, pairs, collate, labels, _cfg(), tmp_path / "a", accelerator)
    assert [h["step"] for h in history] == list(range(1, 7)) and all(h["loss"] == h["contrastive"] for h in history)
    # training lowers the contrastive loss of the training pairs (fixed batches, the model's own loss) by over 10%:
    # 2.51 -> 1.98 (transformers 5), 1.78 -> 1.56 (4.37, another initialisation)
    assert _loss_on(reference, pairs) < 0.9 * _loss_on(_tiny_clip(), pairs)

    resumed = _tiny_clip()
    with pytest.raises(TrainingInterrupted):
        train(resumed, pairs, collate, labels, _cfg(), tmp_path / "b", accelerator, stop_after_step=3)
    resumed = _tiny_clip()  # a fresh process: only the saved state (step 2) survives
    history_b = train(resumed, pairs, collate, labels, _cfg(), tmp_path / "b", accelerator)
    assert [h["step"] for h in history_b] == list(range(1, 7))
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    frozen = _tiny_clip()
    assert torch.equal(frozen.logit_scale, resumed.logit_scale)
    assert not torch.equal(
        frozen.text_model.encoder.layers[0].mlp.fc1.weight,
        resumed.text_model.encoder.layers[0].mlp.fc1.weight,
    )


def test_training_state_refuses_another_world_size(tmp_path):
    model = _tiny_clip()
    params = select_trainable(model, "ffn")
    optimizer = torch.optim.AdamW(params.values())
    state = save_training_state(tmp_path, 5, model, optimizer, [{"step": 5}], world_size=2)
    assert latest_training_state(tmp_path) == state and not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="saved by 2 processes"):
        load_training_state(state, model, optimizer, world_size=1)
    assert load_training_state(state, model, optimizer, world_size=2) == (5, [{"step": 5}])


def test_stage_loss_follows_the_model_family():
    from tiny_models import tiny_siglip_moe_config

    from mllm_encoder import SiglipMoEModel
    from mllm_encoder.dmu.trainer import stage_loss
    from mllm_encoder.losses import clip_contrastive_loss, siglip_sigmoid_loss

    image, text = torch.randn(4, 16), torch.randn(4, 16)
    clip_loss = stage_loss(_tiny_clip(), StageSection())(image, text)
    torch.testing.assert_close(clip_loss, clip_contrastive_loss(image, text, 100.0, label_smoothing=0.1))
    siglip = SiglipMoEModel(tiny_siglip_moe_config())
    with torch.no_grad():
        expected = siglip_sigmoid_loss(image, text, siglip.logit_scale.exp(), siglip.logit_bias)
        torch.testing.assert_close(stage_loss(siglip, StageSection())(image, text), expected)
    forced = stage_loss(siglip, StageSection(loss="softmax", temperature=0.05, label_smoothing=0.0))(image, text)
    torch.testing.assert_close(forced, clip_contrastive_loss(image, text, 20.0))
