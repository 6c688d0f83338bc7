"""transformers' LlavaNext / LlavaOnevision with a tiny CLIP-MoE tower: anyres tiles, generate, aux loss, reload."""

import pytest
import torch
import transformers
from PIL import Image

from mllm_encoder import CLIPMoEVisionModel

HAS = {kind: hasattr(transformers, f"{name}ForConditionalGeneration") for kind, name in
       (("llava_next", "LlavaNext"), ("llava_onevision", "LlavaOnevision"))}  # fmt: skip
KINDS = [
    pytest.param(
        "llava_next",
        marks=pytest.mark.skipif(
            not HAS["llava_next"],
            reason=f"transformers {transformers.__version__} has no LlavaNextForConditionalGeneration (added in 4.39)",
        ),
    ),
    pytest.param(
        "llava_onevision",
        marks=pytest.mark.skipif(
            not HAS["llava_onevision"],
            reason=f"transformers {transformers.__version__} has no LlavaOnevisionForConditionalGeneration "
            "(added in 4.45)",
        ),
    ),
]
# (width, height): wide, tall, square, very wide
IMAGE_SIZES = [(40, 30), (30, 90), (64, 64), (100, 20)]


def images():
    colors = [(200, 30, 30), (30, 200, 60), (40, 60, 220), (230, 220, 40)]
    return [Image.new("RGB", size, color) for size, color in zip(IMAGE_SIZES, colors)]


def encode(processor, texts=None):
    tokenizer = processor.tokenizer
    tokenizer.pad_token, tokenizer.padding_side = tokenizer.unk_token, "left"
    texts = texts or ["<image>\nWhat color is the image?"] * len(IMAGE_SIZES)
    return processor(images=images(), text=texts, return_tensors="pt", padding=True)


@pytest.fixture(scope="module", params=KINDS)
def built(request, llava_workdir):
    from llava_patch.hf.llava_next import build_anyres_llava

    torch.manual_seed(0)
    model, processor = build_anyres_llava(llava_workdir / "clipmoe", llava_workdir / "llm", kind=request.param)
    return request.param, model.eval(), processor


def tower_of(model):
    from llava_patch.hf.llava import llava_vision_tower

    return llava_vision_tower(model)


def test_anyres_forward_and_generate_with_several_aspect_ratios(built):
    kind, model, processor = built
    assert isinstance(tower_of(model), CLIPMoEVisionModel)
    assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == "default"
    inputs = encode(processor)
    image_token = model.config.image_token_index
    tokens_per_image = (inputs["input_ids"] == image_token).sum(dim=1).tolist()
    assert len(set(tokens_per_image)) == len(IMAGE_SIZES)  # unpadding follows each image's aspect ratio
    tile_batches = []
    handle = tower_of(model).register_forward_pre_hook(lambda module, args: tile_batches.append(args[0].shape[0]))
    with torch.no_grad():
        logits = model(**inputs).logits
    handle.remove()
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()
    assert len(tile_batches) == 1 and tile_batches[0] > len(IMAGE_SIZES)  # all tiles of all images in one batch
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape == (len(IMAGE_SIZES), inputs["input_ids"].shape[1] + 3)


def test_tower_aux_loss_is_added_when_installed(built):
    from llava_patch.aux_loss import TowerAuxLoss

    kind, model, processor = built
    inputs = encode(processor)
    tiles = []
    handle = tower_of(model).register_forward_pre_hook(lambda module, args: tiles.append(args[0]))
    plain = model(**inputs, labels=inputs["input_ids"]).loss
    aux = TowerAuxLoss(model)
    with_aux = model(**inputs, labels=inputs["input_ids"]).loss
    added = aux.added
    with torch.no_grad():  # evaluation: the language-model loss alone, as with the LLaVA-1.5 tower
        torch.testing.assert_close(model(**inputs, labels=inputs["input_ids"]).loss, plain.detach())
    aux.remove()
    handle.remove()
    expected_aux = tower_of(model)(tiles[1]).aux_loss  # one tower call per forward: the mean is that call's
    assert aux.coef == model.config.vision_config.router_aux_loss_coef == 0.01
    torch.testing.assert_close(added, aux.coef * expected_aux)
    assert aux.added is None  # the evaluation forward added nothing
    torch.testing.assert_close(with_aux, plain + aux.coef * expected_aux)
    router = tower_of(model).vision_model.encoder.layers[0].mlp.router.weight
    (with_aux - plain).backward()
    assert router.grad is not None and router.grad.abs().sum() > 0  # the aux term trains the router
    model.zero_grad()
    assert torch.equal(model(**inputs, labels=inputs["input_ids"]).loss, plain)  # removed: plain loss again


def test_save_and_reload_keep_tower_weights_and_moe_settings(built, llava_workdir, tmp_path):
    kind, model, processor = built
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    vision = reloaded.config.vision_config
    assert vision.model_type == "clip_moe_vision_model" and (vision.num_experts, vision.top_k) == (4, 2)
    assert reloaded.config.image_grid_pinpoints == model.config.image_grid_pinpoints
    original = CLIPMoEVisionModel.from_pretrained(llava_workdir / "clipmoe").state_dict()
    tower = tower_of(reloaded).state_dict()
    assert set(tower) == set(original) and all(torch.equal(tower[name], original[name]) for name in original)
    expected, actual = model.state_dict(), reloaded.state_dict()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    reloaded_processor = transformers.AutoProcessor.from_pretrained(tmp_path)
    assert type(reloaded_processor) is type(processor)
    inputs, reloaded_inputs = encode(processor), encode(reloaded_processor)
    assert torch.equal(inputs["input_ids"], reloaded_inputs["input_ids"])
    assert torch.equal(inputs["pixel_values"], reloaded_inputs["pixel_values"])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**reloaded_inputs).logits, model(**inputs).logits)


def test_unknown_kind_and_missing_classes_are_named():
    from llava_patch.hf.llava_next import anyres_classes, anyres_grid_pinpoints

    with pytest.raises(ValueError, match="unknown kind 'llava_nxt'; expected one of llava_next, llava_onevision"):
        anyres_classes("llava_nxt")
    if not HAS["llava_onevision"]:
        with pytest.raises(ValueError, match=f"transformers {transformers.__version__} has no LlavaOnevision"):
            anyres_classes("llava_onevision")
    assert anyres_grid_pinpoints(336) == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    onevision = anyres_grid_pinpoints(384, "llava_onevision")
    assert len(onevision) == 36 and onevision[0] == [384, 384] and onevision[-1] == [2304, 2304]


@pytest.mark.skipif(not HAS["llava_next"], reason=f"transformers {transformers.__version__} has no LlavaNext")
def test_a_siglip_tower_is_refused_before_anything_loads(clip_tokenizer_dir, tmp_path):
    from tiny_models import write_tiny_siglip_base

    from llava_patch.hf.llava_next import build_anyres_llava

    siglip_dir = write_tiny_siglip_base(tmp_path / "siglip", clip_tokenizer_dir)
    message = "holds a SiglipMoEVisionModel tower; this build takes only CLIPMoEVisionModel"
    with pytest.raises(ValueError, match=f"{siglip_dir}: {message}"):
        build_anyres_llava(siglip_dir, tmp_path / "no-llm-here")
