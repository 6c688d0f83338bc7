"""transformers' own LlavaForConditionalGeneration with a CLIP-MoE vision tower: build, train, save, reload."""

import torch
from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import mllm_encoder
from mllm_encoder import CLIPMoEVisionConfig, CLIPMoEVisionModel

IMAGE_TOKEN = 127


def tiny_llava_config() -> LlavaConfig:
    vision = CLIPMoEVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=32, patch_size=8, num_experts=4, top_k=2,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256,
    )  # fmt: skip
    return LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2, image_token_index=IMAGE_TOKEN)


def inputs(batch: int = 2):
    # transformers < 4.48 expands one image token per image itself; newer versions expect one per patch.
    legacy = hasattr(LlavaForConditionalGeneration, "_merge_input_ids_with_image_features")
    generator = torch.Generator().manual_seed(0)
    image_tokens = torch.full((batch, 1 if legacy else 16), IMAGE_TOKEN)
    input_ids = torch.cat([image_tokens, torch.randint(3, 100, (batch, 8), generator=generator)], dim=1)
    pixel_values = torch.randn(batch, 3, 32, 32, generator=generator)
    return dict(input_ids=input_ids, pixel_values=pixel_values, attention_mask=torch.ones_like(input_ids))


def vision_tower(model) -> torch.nn.Module:
    from llava_patch.hf.llava import llava_vision_tower

    return llava_vision_tower(model)


def test_hf_llava_round_trip(tmp_path):
    assert mllm_encoder.CLIPMoEVisionConfig.model_type == "clip_moe_vision_model"
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(tiny_llava_config())
    assert isinstance(vision_tower(model), CLIPMoEVisionModel)
    batch = inputs()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(2):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[1] < losses[0]
    router = vision_tower(model).vision_model.encoder.layers[0].mlp.router.weight
    model.save_pretrained(tmp_path)
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert reloaded.config.vision_config.num_experts == 4 and reloaded.config.vision_feature_layer == -2
    expected, actual = model.state_dict(), reloaded.state_dict()
    assert set(expected) == set(actual)
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    assert torch.equal(vision_tower(reloaded).vision_model.encoder.layers[0].mlp.router.weight, router)
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits)
        generated = reloaded.generate(**inputs(batch=1), max_new_tokens=3, do_sample=False)
    assert generated.shape[1] >= 3


def test_hf_llava_projects_layer_minus_two_patch_features():
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(tiny_llava_config()).eval()
    batch = inputs()
    owner = model if hasattr(model, "multi_modal_projector") else model.model
    projector = owner.multi_modal_projector
    seen = []
    handle = projector.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    with torch.no_grad():
        model(**batch)
        hidden = vision_tower(model)(batch["pixel_values"], output_hidden_states=True).hidden_states
    handle.remove()
    torch.testing.assert_close(seen[0], hidden[-2][:, 1:])


def test_build_hf_llava_from_clip_moe_and_llm(llava_workdir, tmp_path):
    from transformers import AutoModelForCausalLM

    from llava_patch.hf.llava import build_hf_llava, llava_vision_tower

    model, tokenizer, processor = build_hf_llava(llava_workdir / "clipmoe", llava_workdir / "llm")
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    assert model.config.image_token_index == image_token == len(tokenizer) - 1
    assert processor.crop_size["height"] == model.config.vision_config.image_size == 32
    vision = CLIPMoEVisionModel.from_pretrained(llava_workdir / "clipmoe")
    tower = llava_vision_tower(model).state_dict()
    assert all(torch.equal(tower[name], tensor) for name, tensor in vision.state_dict().items())
    language_model = AutoModelForCausalLM.from_pretrained(llava_workdir / "llm").eval()
    text = tokenizer("What color is the image?", return_tensors="pt")
    with torch.no_grad():
        logits = model.eval()(**text).logits[..., : len(tokenizer) - 1]
        torch.testing.assert_close(logits, language_model(**text).logits)
    model.save_pretrained(tmp_path)
    assert LlavaForConditionalGeneration.from_pretrained(tmp_path).config.vision_config.num_experts == 4


def test_build_hf_llava_from_a_siglip_moe_tower(llava_workdir, clip_tokenizer_dir, tmp_path):
    """A SigLIP-MoE tower: every patch projected ('full', no class token), saved, reloaded with the same logits."""
    from tiny_models import write_tiny_siglip_base

    from llava_patch.hf.llava import build_hf_llava, llava_vision_tower
    from mllm_encoder import SiglipMoEVisionModel

    siglip_dir = write_tiny_siglip_base(tmp_path / "siglip", clip_tokenizer_dir)
    model, tokenizer, processor = build_hf_llava(siglip_dir, llava_workdir / "llm")
    assert model.config.vision_feature_select_strategy == "full"  # no class token to drop
    assert type(processor).__name__ == "SiglipImageProcessor"
    tower = llava_vision_tower(model)
    assert isinstance(tower, SiglipMoEVisionModel)
    vision = SiglipMoEVisionModel.from_pretrained(siglip_dir)
    assert all(torch.equal(tower.state_dict()[name], value) for name, value in vision.state_dict().items())
    num_patches = (32 // vision.config.patch_size) ** 2
    legacy = hasattr(LlavaForConditionalGeneration, "_merge_input_ids_with_image_features")
    image_token = model.config.image_token_index
    input_ids = torch.tensor([[image_token] * (1 if legacy else num_patches) + [5, 6, 7]])
    pixel_values = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    batch = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixel_values)
    owner = model if hasattr(model, "multi_modal_projector") else model.model
    seen = []
    handle = owner.multi_modal_projector.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    with torch.no_grad():
        logits = model.eval()(**batch).logits
        hidden = tower(pixel_values, output_hidden_states=True).hidden_states
    handle.remove()
    assert seen[0].shape[-2] == num_patches
    torch.testing.assert_close(seen[0], hidden[-2])  # every patch token of layer -2, none dropped
    model.save_pretrained(tmp_path / "llava")
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava").eval()
    assert reloaded.config.vision_config.model_type == "siglip_moe_vision_model"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, logits, rtol=0, atol=0)
