"""One aux-loss definition for LLaVA-1.5 (llava_patch) and transformers' Llava: coef x mean over the tower calls of
one forward, only while the tower trains (llava_patch.aux_loss)."""

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import llava_patch
from llava_patch.aux_loss import TowerAuxLoss
from llava_patch.hf.llava import llava_vision_tower
from mllm_encoder import CLIPMoEVisionConfig
from mllm_encoder.outputs import MoEModelOutputWithPooling

IMAGE_TOKEN = 127


@pytest.fixture(scope="module", autouse=True)
def patched():
    llava_patch.apply()


@pytest.fixture(scope="module")
def llava15(tiny_llava_dir):
    """LLaVA-1.5 whose forward calls the tower's encoder once per image: two calls for two images."""
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM

    model = LlavaLlamaForCausalLM.from_pretrained(str(tiny_llava_dir), torch_dtype=torch.float32)
    inner = model.get_model()
    # LLaVA's tower interface takes a list of images (one encoder call each); LLaVA-1.5 itself sends a batch.
    model.encode_images = lambda images: inner.mm_projector(torch.cat(inner.get_vision_tower()(list(images))))
    return model


class OneCallPerImage(nn.Module):
    """transformers' Llava tower, calling the encoder once per image: two calls for two images."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> MoEModelOutputWithPooling:
        kwargs["return_dict"] = True
        outputs = [self.encoder(image[None], **kwargs) for image in pixel_values]
        return MoEModelOutputWithPooling(
            last_hidden_state=torch.cat([output.last_hidden_state for output in outputs]),
            hidden_states=tuple(torch.cat(layer) for layer in zip(*(output.hidden_states for output in outputs))),
        )


def hf_llava(encoder: nn.Module) -> LlavaForConditionalGeneration:
    """transformers' Llava with a copy of ``encoder`` (the LLaVA-1.5 tower's, same layers) as its tower."""
    text = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256,
    )  # fmt: skip
    vision = CLIPMoEVisionConfig(**encoder.config.to_dict())
    config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-1, image_token_index=IMAGE_TOKEN)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    tower = llava_vision_tower(model)
    missing, unexpected = tower.load_state_dict(encoder.state_dict(), strict=False)
    assert not unexpected and all(name.startswith("vision_model.post_layernorm.") for name in missing)
    owner = model if hasattr(model, "vision_tower") else model.model
    owner.vision_tower = OneCallPerImage(tower)
    return model


def llava15_batch(model, images: torch.Tensor):
    from llava.constants import IMAGE_TOKEN_INDEX

    text = torch.randint(3, 100, (len(images), 8), generator=torch.Generator().manual_seed(1))
    input_ids = torch.cat([torch.full((len(images), 1), IMAGE_TOKEN_INDEX), text], dim=1)
    labels = torch.cat([torch.full((len(images), 1), -100), text], dim=1)
    return dict(input_ids=input_ids, labels=labels, images=images)


def hf_batch(images: torch.Tensor):
    legacy = hasattr(LlavaForConditionalGeneration, "_merge_input_ids_with_image_features")  # < 4.48: one token
    text = torch.randint(3, 100, (len(images), 8), generator=torch.Generator().manual_seed(1))
    input_ids = torch.cat([torch.full((len(images), 1 if legacy else 16), IMAGE_TOKEN), text], dim=1)
    return dict(input_ids=input_ids, pixel_values=images, labels=input_ids, attention_mask=torch.ones_like(input_ids))


def test_both_llava_kinds_add_coef_times_the_mean_over_the_tower_calls(llava15):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tower = llava15.get_vision_tower()
    encoder = tower.vision_tower
    coef = encoder.config.router_aux_loss_coef
    per_call = [encoder(image[None], output_aux_loss=True).aux_loss.detach() for image in images]
    assert coef == 0.01 and abs(per_call[0] - per_call[1]) > 1e-4  # distinct calls: a mean, not either one
    expected = coef * (per_call[0] + per_call[1]) / 2

    batch = llava15_batch(llava15, images)
    tower.requires_grad_(False)
    frozen = llava15(**batch).loss  # a frozen tower adds nothing
    tower.requires_grad_(True)
    trained = llava15(**batch).loss
    tower.requires_grad_(False)

    model = hf_llava(encoder)
    calls = []
    llava_vision_tower(model).encoder.register_forward_hook(lambda module, args, output: calls.append(output))
    plain = model(**hf_batch(images)).loss
    aux = TowerAuxLoss(model, llava_vision_tower(model).encoder)
    with_aux = model(**hf_batch(images)).loss
    aux.remove()

    assert len(calls) == 4  # two encoder calls per forward
    torch.testing.assert_close(trained - frozen, expected, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(with_aux - plain, expected, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(aux.added, expected)
