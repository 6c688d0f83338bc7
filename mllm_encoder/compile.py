"""One switch to run a CLIP-MoE tower under ``torch.compile``: whole graph, static shapes, CUDA-graph ready.

``compile_tower(model)`` compiles ``model`` in place (``nn.Module.compile``, so parameter names and
checkpoints are unchanged) with ``fullgraph=True`` and ``dynamic=False``: one graph per batch size, and a
graph break is an error rather than a silent slowdown. ``mode="reduce-overhead"`` adds CUDA graphs, which
removes the per-kernel launch cost that dominates a batch of one image. For a LLaVA tower
(:class:`mllm_encoder.vision_tower.CLIPMoEVisionTower`) pass ``tower.vision_tower``.

The MoE layers trace without a host synchronisation on the grouped backend (bf16, see
:func:`mllm_encoder.moe.experts.resolve_backend`). The loop backend (fp16/fp32) reads the per-expert slice
sizes on the host: it still traces as one graph (with data-dependent sizes) but syncs once per layer, so it
cannot be captured in a CUDA graph: use bf16 for ``mode="reduce-overhead"``.

With CUDA graphs the outputs of a call live in the graph's memory pool and are overwritten by the next
call of the same batch size: clone what must outlive it.
"""

import logging
from typing import Callable, Optional, Union

from torch import nn

logger = logging.getLogger(__name__)

MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_tower(
    model: nn.Module, mode: Optional[str] = None, backend: Union[str, Callable] = "inductor"
) -> nn.Module:
    """Compile ``model`` (a CLIP-MoE / CLIP tower) in place for whole-graph, static-shape execution.

    Args:
        model: the module to compile, e.g. a ``CLIPMoEVisionModel`` or a LLaVA tower's ``vision_tower``.
        mode: ``torch.compile`` mode; ``"reduce-overhead"`` captures CUDA graphs.
        backend: ``torch.compile`` backend (``"inductor"``; ``"eager"`` / ``"aot_eager"`` only trace).

    Returns:
        ``model`` itself.
    """
    if mode not in MODES:
        raise ValueError(f"compile_tower: mode must be one of {MODES}, got {mode!r}")
    model.compile(fullgraph=True, dynamic=False, mode=mode, backend=backend)
    logger.info("compiling %s on first call (fullgraph, static shapes, mode=%s)", type(model).__name__, mode)
    return model
