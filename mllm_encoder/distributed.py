"""Explicit distributed state and an all-gather that carries gradients back to every rank."""

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistState:
    """Who this process is among ``world_size`` processes.

    ``all_gather`` is injectable so that tests can fake several ranks in one process; by default it is
    :func:`torch.distributed.all_gather` when ``world_size > 1``.
    """

    world_size: int = 1
    rank: int = 0
    all_gather: Optional[Callable[[List[torch.Tensor], torch.Tensor], None]] = None
    all_reduce: Optional[Callable[[torch.Tensor], None]] = None

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"invalid distributed state: rank {self.rank} of world_size {self.world_size}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_torch(cls) -> "DistState":
        """The state of the initialised ``torch.distributed`` process group (single process if none)."""
        if dist.is_available() and dist.is_initialized():
            return cls(world_size=dist.get_world_size(), rank=dist.get_rank())
        return cls()

    def gather_into(self, chunks: List[torch.Tensor], tensor: torch.Tensor) -> None:
        (self.all_gather or dist.all_gather)(chunks, tensor)

    def sum_reduce(self, tensor: torch.Tensor) -> None:
        if self.all_reduce is not None:
            self.all_reduce(tensor)
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def gather_sizes(batch: int, state: DistState, device: Optional[torch.device] = None) -> List[int]:
    """Every rank's number of rows (ranks may hold fewer after dropping bad samples), exchanged as tensors on
    ``device``: the embeddings' device, since NCCL gathers only CUDA tensors."""
    if state.world_size == 1:
        return [batch]
    chunks = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(state.world_size)]
    state.gather_into(chunks, torch.tensor([batch], dtype=torch.long, device=device))
    return [int(chunk.item()) for chunk in chunks]


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: concatenate every rank's rows. Backward: sum the gradient over ranks, keep our rows."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, state: DistState, sizes: List[int]) -> torch.Tensor:
        ctx.state, ctx.sizes = state, sizes
        padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        chunks = [torch.empty_like(padded) for _ in range(state.world_size)]
        state.gather_into(chunks, padded)
        return torch.cat([chunk[:size] for chunk, size in zip(chunks, sizes)], dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        ctx.state.sum_reduce(grad)
        start = sum(ctx.sizes[: ctx.state.rank])
        return grad[start : start + ctx.sizes[ctx.state.rank]], None, None


def all_gather_with_grad(tensor: torch.Tensor, state: DistState, sizes: Optional[List[int]] = None) -> torch.Tensor:
    """All-gather ``tensor`` along dim 0 from every rank (row counts may differ), differentiably.

    Every rank's loss that uses the gathered tensor sends its gradient back to the rank that owns each
    slice, so that the sum of the per-rank losses has exact gradients (DDP then averages them).
    ``sizes`` (every rank's row count) is gathered when not given.
    """
    if state.world_size == 1:
        return tensor
    sizes = sizes if sizes is not None else gather_sizes(tensor.shape[0], state, tensor.device)
    return _AllGatherWithGrad.apply(tensor, state, sizes)
