"""The CLIP (softmax) contrastive loss and the all-gather under it: 2 gloo processes equal the single-process loss,
gradients too (the sigmoid loss: test_sigmoid_loss.py)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from process_helpers import free_port

from mllm_encoder.distributed import DistState, all_gather_with_grad
from mllm_encoder.losses import clip_contrastive_loss

BATCH, DIM = 6, 8


def _towers_and_data():
    torch.manual_seed(0)
    image_tower, text_tower = torch.nn.Linear(10, DIM), torch.nn.Linear(12, DIM)
    images, texts = torch.randn(2 * BATCH, 10), torch.randn(2 * BATCH, 12)
    return image_tower, text_tower, images, texts


def _grads(*towers):
    return torch.cat([p.grad.flatten() for t in towers for p in t.parameters()])


def _worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    image_tower, text_tower, images, texts = _towers_and_data()
    part = slice(rank * BATCH, (rank + 1) * BATCH)
    loss = clip_contrastive_loss(image_tower(images[part]), text_tower(texts[part]), 100.0, DistState.from_torch(), 0.1)
    loss.backward()
    grads = _grads(image_tower, text_tower)
    dist.all_reduce(grads)  # what DDP does: average the gradients over ranks
    dist.all_reduce(loss_sum := loss.detach().clone())
    uneven = _uneven_gather(rank)
    if rank == 0:  # numpy: torch tensors would travel as shared memory that dies with this process
        queue.put([t.detach().numpy() for t in (loss_sum / 2, grads / 2, *uneven)])
    dist.barrier()
    dist.destroy_process_group()


def _uneven_gather(rank: int):
    """Ranks with 3 and 5 rows (bad samples dropped): rows come back in order, gradients to their owner."""
    rows = torch.arange(16.0).reshape(8, 2)
    mine = (rows[:3] if rank == 0 else rows[3:]).clone().requires_grad_()
    gathered = all_gather_with_grad(mine, DistState.from_torch())
    (gathered * rows).sum().backward()
    return gathered.detach(), mine.grad


@pytest.mark.multiprocess
def test_softmax_loss_on_two_gloo_ranks_matches_single_process():
    image_tower, text_tower, images, texts = _towers_and_data()
    reference = clip_contrastive_loss(image_tower(images), text_tower(texts), 100.0, label_smoothing=0.1)
    reference.backward()
    context = mp.get_context("spawn")
    queue = context.Queue()
    mp.start_processes(_worker, args=(free_port(), queue), nprocs=2, join=False, start_method="spawn")
    loss, grads, gathered, rank0_grad = map(torch.from_numpy, queue.get(timeout=60))
    torch.testing.assert_close(gathered, torch.arange(16.0).reshape(8, 2))
    torch.testing.assert_close(rank0_grad, 2 * torch.arange(6.0).reshape(3, 2))
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads, _grads(image_tower, text_tower), rtol=1e-4, atol=1e-6)


def test_fake_gather_carries_gradient_to_the_owner():
    """Two fake ranks in one process: the backward sums both ranks' gradients onto each slice."""
    shared = {}

    def gather(chunks, tensor):
        shared.setdefault("parts", []).append(tensor)
        for i in range(len(chunks)):
            chunks[i].copy_(torch.arange(4.0).reshape(2, 2) if i else tensor)

    def reduce(tensor):
        tensor.mul_(2)  # the other rank sends an identical gradient

    x = torch.ones(2, 2, requires_grad=True)
    gathered = all_gather_with_grad(x, DistState(2, 0, all_gather=gather, all_reduce=reduce), sizes=[2, 2])
    assert gathered.shape == (4, 2)
    (gathered * torch.arange(8.0).reshape(4, 2)).sum().backward()
    torch.testing.assert_close(x.grad, 2 * torch.arange(4.0).reshape(2, 2))


def test_loss_checks_shapes_and_is_finite():
    with pytest.raises(ValueError):
        clip_contrastive_loss(torch.randn(3, 4), torch.randn(2, 4), 100.0)
    perfect = torch.eye(4)
    low = clip_contrastive_loss(perfect, perfect, 100.0)
    assert low.item() < 1e-6
    assert (
        clip_contrastive_loss(perfect, perfect, 100.0, label_smoothing=0.1).item() > low.item()
    )  # smoothing keeps a floor
