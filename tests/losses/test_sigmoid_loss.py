"""The sigmoid loss on 2 gloo processes equals the single-process loss and gradients; the loss of a model's family."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from process_helpers import free_port
from tiny_models import tiny_clip_moe_config, tiny_siglip_moe_config

from mllm_encoder import CLIPMoEModel, SiglipMoEModel
from mllm_encoder.distributed import DistState
from mllm_encoder.families import loss_kind_of
from mllm_encoder.losses import clip_contrastive_loss, contrastive_loss_for, siglip_sigmoid_loss

BATCH, DIM = 6, 8


def _towers_and_data():
    torch.manual_seed(0)
    image_tower, text_tower = torch.nn.Linear(10, DIM), torch.nn.Linear(12, DIM)
    scale, bias = torch.nn.Parameter(torch.tensor([1.5])), torch.nn.Parameter(torch.tensor([-2.0]))
    images, texts = torch.randn(2 * BATCH, 10), torch.randn(2 * BATCH, 12)
    return (image_tower, text_tower, scale, bias), images, texts


def _loss(params, images, texts, state=None):
    image_tower, text_tower, scale, bias = params
    return siglip_sigmoid_loss(image_tower(images), text_tower(texts), scale.exp(), bias, state)


def _grads(params):
    image_tower, text_tower, scale, bias = params
    return torch.cat([p.grad.flatten() for p in (*image_tower.parameters(), *text_tower.parameters(), scale, bias)])


def _worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    params, images, texts = _towers_and_data()
    part = slice(rank * BATCH, (rank + 1) * BATCH)
    loss = _loss(params, images[part], texts[part], DistState.from_torch())
    loss.backward()
    grads = _grads(params)
    dist.all_reduce(grads)  # what DDP does: average the gradients over ranks
    dist.all_reduce(loss_sum := loss.detach().clone())
    if rank == 0:  # numpy: torch tensors would travel as shared memory that dies with this process
        queue.put([t.detach().numpy() for t in (loss_sum / 2, grads / 2)])
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.multiprocess
def test_sigmoid_loss_on_two_gloo_ranks_matches_single_process():
    params, images, texts = _towers_and_data()
    reference = _loss(params, images, texts)
    reference.backward()
    queue = mp.get_context("spawn").Queue()
    mp.start_processes(_worker, args=(free_port(), queue), nprocs=2, join=False, start_method="spawn")
    loss, grads = map(torch.from_numpy, queue.get(timeout=60))
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads, _grads(params), rtol=1e-4, atol=1e-6)


def test_fake_ranks_in_one_process_match_the_global_batch():
    """Two ranks simulated with the injectable gather: the mean of their losses is the global loss."""
    params, images, texts = _towers_and_data()
    image_embeds = params[0](images).detach()
    text_embeds = params[1](texts).detach()
    reference = siglip_sigmoid_loss(image_embeds, text_embeds, 4.0, -2.0)

    def gather(chunks, tensor):
        if tensor.dtype == torch.long:  # the row counts
            return [chunk.fill_(BATCH) for chunk in chunks]
        for i, chunk in enumerate(chunks):  # each rank's normalised images
            chunk.copy_(torch.nn.functional.normalize(image_embeds[i * BATCH : (i + 1) * BATCH]))

    losses = [
        siglip_sigmoid_loss(
            image_embeds[r * BATCH : (r + 1) * BATCH],
            text_embeds[r * BATCH : (r + 1) * BATCH],
            4.0,
            -2.0,
            DistState(2, r, all_gather=gather, all_reduce=lambda t: None),
        )
        for r in range(2)
    ]
    torch.testing.assert_close(sum(losses) / 2, reference)


def test_contrastive_loss_for_picks_the_family():
    torch.manual_seed(0)
    siglip, clip = SiglipMoEModel(tiny_siglip_moe_config()), CLIPMoEModel(tiny_clip_moe_config())
    assert loss_kind_of(siglip) == "sigmoid" and loss_kind_of(clip) == "softmax"
    image, text = torch.randn(4, 16), torch.randn(4, 16)
    with torch.no_grad():
        siglip.logit_scale.fill_(2.0)
        siglip.logit_bias.fill_(-3.0)
    model_loss = contrastive_loss_for(siglip, kind=loss_kind_of(siglip))(image, text)
    torch.testing.assert_close(model_loss, siglip_sigmoid_loss(image, text, torch.tensor(2.0).exp(), -3.0))
    model_loss.backward()
    assert siglip.logit_bias.grad is not None  # the model's own (learnable) bias and scale
    fixed = contrastive_loss_for(siglip, temperature=0.1, kind="sigmoid", logit_bias=-5.0)(image, text)
    torch.testing.assert_close(fixed, siglip_sigmoid_loss(image, text, 10.0, -5.0))
    softmax = contrastive_loss_for(clip, temperature=0.01, label_smoothing=0.1, kind=loss_kind_of(clip))(image, text)
    torch.testing.assert_close(softmax, clip_contrastive_loss(image, text, 100.0, label_smoothing=0.1))
    overridden = contrastive_loss_for(siglip, temperature=0.01, kind="softmax")(image, text)
    torch.testing.assert_close(overridden, clip_contrastive_loss(image, text, 100.0))
    with pytest.raises(ValueError, match="label_smoothing"):
        contrastive_loss_for(siglip, label_smoothing=0.1, kind="sigmoid")
    with pytest.raises(ValueError, match="logit_bias"):
        contrastive_loss_for(clip, temperature=0.01, kind="sigmoid")
    with pytest.raises(ValueError, match="loss kind"):
        contrastive_loss_for(clip, kind="hinge")


def test_tiny_siglip_base_trains_its_ffns_with_the_family_loss(tmp_path, clip_tokenizer_dir):
    """What the DMU trainer does on a SigLIP base: load, pick the loss from the model, one FFN-only step."""
    from tiny_models import write_tiny_siglip_base

    from mllm_encoder.checkpoint import load_processors
    from mllm_encoder.data.preprocess import ClipImageTransform
    from mllm_encoder.layers import is_encoder_ffn_parameter
    from mllm_encoder.loading import load_clip_moe

    base = write_tiny_siglip_base(tmp_path / "base", clip_tokenizer_dir, context=16)
    model = load_clip_moe(base).train()
    image_processor, tokenizer = load_processors(base)
    assert type(image_processor).__name__ == "SiglipImageProcessor" and tokenizer is not None
    transform = ClipImageTransform.from_processor(image_processor)  # the DMU data path: square resize, no crop
    assert transform.resize_hw == (32, 32) and transform.crop_hw is None and tuple(transform.mean) == (0.5,) * 3
    for name, param in model.named_parameters():
        param.requires_grad_(is_encoder_ffn_parameter(name))  # encoder FFNs, not the pooling head's MLP
    loss_fn = contrastive_loss_for(model, kind=loss_kind_of(model))
    tokens = tokenizer(["a red square", "a blue circle"], padding="max_length", max_length=16, return_tensors="pt")
    out = model(input_ids=tokens["input_ids"], pixel_values=torch.randn(2, 3, 32, 32))
    loss = loss_fn(out.image_embeds, out.text_embeds)
    loss.backward()
    assert model.vision_model.encoder.layers[0].mlp.fc1.weight.grad.abs().sum() > 0
    assert model.vision_model.head.mlp.fc1.weight.grad is None and model.logit_bias.grad is None
