"""The contrastive training loop shared by every stage (MCL, router tuning, baselines, the demo's base).

Reads top to bottom like nanoGPT: choose trainable parameters, build AdamW, resume, then for each step
set the learning rate (warmup + cosine), run the micro-steps with gradient accumulation, clip, step, log
and save. Distribution and mixed precision come from Hugging Face Accelerate (DDP, or DeepSpeed through
an accelerate config); a single CPU process runs the same code.
"""

import contextlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Union

import torch
from accelerate.utils import DistributedType
from tqdm.auto import tqdm

from mllm_encoder.distributed import DistState
from mllm_encoder.dmu import config
from mllm_encoder.dmu.config import RuntimeSection, StageSection, check_section
from mllm_encoder.dmu.run_state import latest_training_state, load_training_state, save_training_state
from mllm_encoder.dmu.sampler import ClusterBatchSampler
from mllm_encoder.families import loss_kind_of
from mllm_encoder.layers import is_encoder_ffn_parameter
from mllm_encoder.losses import ContrastiveLoss, contrastive_loss_for

logger = logging.getLogger(__name__)

TRAINABLE = {
    "all": lambda name: True,
    "ffn": lambda name: is_encoder_ffn_parameter(name) and ".mlp.router." not in name,
    "router": lambda name: ".mlp.router." in name,
    "ffn+router": is_encoder_ffn_parameter,  # encoder FFNs only: not SigLIP's pooling-head MLP
}
FAMILY_LOSS_DEFAULTS = {"softmax": (0.01, 0.1), "sigmoid": (None, 0.0)}  # (temperature, label smoothing)
assert set(TRAINABLE) == set(config.TRAINABLE)


class TrainingInterrupted(RuntimeError):
    """Raised by the injected stop (``stop_after_step``): tests interrupt a stage this way."""


@dataclass(frozen=True)
class TrainConfig:
    """One training stage as the trainer runs it: the stage's hyper-parameters, its resolved step count,
    the seed of its batches and the runtime settings (saving, logging, checkpointing)."""

    stage: StageSection
    steps: int
    seed: int = 0
    runtime: RuntimeSection = field(default_factory=RuntimeSection)
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be positive, got {self.steps}")
        check_section(self.stage, "stage")
        check_section(self.runtime, "runtime")

    @property
    def warmup_steps(self) -> int:
        """The stage's warmup, capped so that a short stage still reaches its peak learning rate."""
        return min(self.stage.warmup_steps, max(self.steps - 1, 0))


def select_trainable(model: torch.nn.Module, trainable: str) -> Dict[str, torch.nn.Parameter]:
    """Freeze everything except the parameters named by ``trainable``; returns those parameters."""
    keep = TRAINABLE[trainable]
    selected = {}
    for name, param in model.named_parameters():
        param.requires_grad_(keep(name))
        if param.requires_grad:
            selected[name] = param
    if not selected:
        raise ValueError(f"no parameter of the model matches trainable={trainable!r}")
    return selected


def build_optimizer(params: Dict[str, torch.nn.Parameter], stage: StageSection) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay on every tensor unless ``decay_norms_and_biases``
    is false (then biases, norms and other 1-d tensors are not decayed)."""
    decayed = {name: p for name, p in params.items() if stage.decay_norms_and_biases or p.ndim >= 2}
    groups = [
        {"params": list(decayed.values()), "weight_decay": stage.weight_decay},
        {"params": [p for name, p in params.items() if name not in decayed], "weight_decay": 0.0},
    ]
    groups = [group for group in groups if group["params"]]
    options = dict(lr=stage.lr, betas=tuple(stage.adam_betas), eps=stage.adam_eps)
    try:  # the fused kernel: several times faster on CPU (torch >= 2.4) and GPU
        return torch.optim.AdamW(groups, **options, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, **options)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup for ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr`` at ``steps``."""
    lr, warmup = cfg.stage.lr, cfg.warmup_steps
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    min_lr = cfg.stage.min_lr_ratio * lr
    return min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (lr - min_lr)


class _ResumableBatches:
    """Endless micro-batches of indices across epochs, starting at micro-batch ``start``."""

    def __init__(self, labels: Sequence[int], cfg: TrainConfig, state: DistState, start: int) -> None:
        self.sampler = ClusterBatchSampler(
            labels, cfg.stage.batch_size, state.world_size, state.rank, seed=cfg.seed, drop_last=cfg.stage.drop_last
        )
        self.per_epoch = len(self.sampler)
        self.start = start

    def __iter__(self) -> Iterator[List[int]]:
        epoch, offset = divmod(self.start, self.per_epoch)
        while True:
            self.sampler.set_epoch(epoch, start_step=offset)
            yield from self.sampler
            epoch, offset = epoch + 1, 0


def stage_loss(model: torch.nn.Module, stage: StageSection) -> ContrastiveLoss:
    """The contrastive loss of a stage: ``stage.loss`` or the model family's (softmax for CLIP, sigmoid for
    SigLIP), with the stage's temperature and label smoothing or the family's defaults (CLIP: the paper's
    fixed 0.01 and 0.1; SigLIP: the model's learned scale and bias, no smoothing)."""
    kind = stage.loss or loss_kind_of(model)
    default_temperature, default_smoothing = FAMILY_LOSS_DEFAULTS[kind]
    temperature = stage.temperature if stage.temperature is not None else default_temperature
    smoothing = stage.label_smoothing if stage.label_smoothing is not None else default_smoothing
    return contrastive_loss_for(model, temperature, smoothing, kind=kind)


def _micro_step_loss(model: torch.nn.Module, batch: Dict[str, torch.Tensor], loss, cfg: TrainConfig, state):
    outputs = model(
        input_ids=batch["input_ids"],
        pixel_values=batch["pixel_values"],
        attention_mask=batch["attention_mask"],
    )
    contrastive = loss(outputs.image_embeds, outputs.text_embeds, state)
    aux = getattr(outputs, "aux_loss", None)
    # an MoE forward that routed tokens while autograd records has its aux loss (layers.wants_aux_loss)
    assert aux is not None or not getattr(outputs, "router_logits", None) or not torch.is_grad_enabled()
    aux = aux.float() if aux is not None else torch.zeros((), device=contrastive.device)
    return contrastive + cfg.stage.aux_loss_coef * aux, contrastive.detach(), aux.detach()


def _next_batch(batches: Iterator, device) -> Dict[str, torch.Tensor]:
    batch = next(batches)
    while batch is None:  # every sample of the batch was bad (the collator counts and limits them)
        logger.warning("skipping a batch whose samples all failed to load")
        batch = next(batches)
    return {key: value.to(device) for key, value in batch.items() if torch.is_tensor(value)}


def _accumulate_gradients(
    model, batches: Iterator, loss_fn: ContrastiveLoss, cfg: TrainConfig, accelerator, state: DistState
) -> Dict[str, float]:
    totals = {"loss": 0.0, "contrastive": 0.0, "aux": 0.0}
    grad_accum = cfg.stage.grad_accum
    for micro in range(grad_accum):
        batch = _next_batch(batches, accelerator.device)
        sync = micro == grad_accum - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(model):
            loss, contrastive, aux = _micro_step_loss(model, batch, loss_fn, cfg, state)
            accelerator.backward(loss / grad_accum)
        for key, value in (("loss", loss), ("contrastive", contrastive), ("aux", aux)):
            totals[key] += value.item() / grad_accum
    return totals


def _prepare_model(model: torch.nn.Module, cfg: TrainConfig) -> Dict[str, torch.nn.Parameter]:
    params = select_trainable(model, cfg.stage.trainable)
    if cfg.runtime.gradient_checkpointing and getattr(model, "supports_gradient_checkpointing", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return params


def _log_step(record: Dict[str, float], writer, history: List[Dict[str, float]], cfg: TrainConfig, bar) -> None:
    history.append(record)
    if writer is not None:
        for key, value in record.items():
            if key != "step":
                writer.add_scalar(f"train/{key}", value, record["step"])
    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
    if record["step"] % cfg.runtime.log_every == 0:
        logger.info("step %d: %s", record["step"], {k: round(v, 5) for k, v in record.items() if k != "step"})


def _save(ckpt_dir, step: int, accelerator, wrapped, optimizer, history) -> None:
    """Save the resumable state on the main process (not under DeepSpeed, whose optimizer is sharded)."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return  # a DeepSpeed run resumes an interrupted stage from its start
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(wrapped)
        save_training_state(ckpt_dir, step, model, optimizer, history, world_size=accelerator.num_processes)
    accelerator.wait_for_everyone()


def train(
    model: torch.nn.Module,
    dataset: torch.utils.data.Dataset,
    collate_fn: Callable,
    labels: Sequence[int],
    cfg: TrainConfig,
    ckpt_dir: Union[str, Path],
    accelerator,
    writer=None,
    stop_after_step: Optional[int] = None,
    desc: str = "train",
) -> List[Dict[str, float]]:
    """Train ``model`` in place for ``cfg.steps`` optimizer steps on batches of one ``labels`` cluster each.

    Resumes from the newest state in ``ckpt_dir`` (weights, optimizer, RNG, data position = step) and
    saves there every ``runtime.save_every`` steps and at the end. Returns the per-step history (step, lr,
    loss, contrastive, aux, grad_norm), including the steps before a resume. ``stop_after_step`` raises
    :class:`TrainingInterrupted` after that step (tests use it to interrupt a stage).
    """
    state = DistState(accelerator.num_processes, accelerator.process_index)
    params = _prepare_model(model, cfg)
    optimizer = build_optimizer(params, cfg.stage)
    start_step, history = 0, []
    latest = latest_training_state(ckpt_dir)
    if latest is not None:
        start_step, history = load_training_state(latest, model, optimizer, accelerator.num_processes)
        logger.info("%s: resuming from %s (step %d)", desc, latest, start_step)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    loss_fn = stage_loss(model, cfg.stage)
    index_batches = _ResumableBatches(labels, cfg, state, start_step * cfg.stage.grad_accum)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=index_batches, collate_fn=collate_fn, num_workers=cfg.num_workers
    )
    batches = iter(loader)
    bar = tqdm(
        range(start_step, cfg.steps),
        desc=desc,
        initial=start_step,
        total=cfg.steps,
        disable=not accelerator.is_main_process,
    )
    for step in bar:
        lr = learning_rate(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        totals = _accumulate_gradients(wrapped, batches, loss_fn, cfg, accelerator, state)
        max_norm = cfg.stage.grad_clip if cfg.stage.grad_clip is not None else math.inf  # inf: measure only
        grad_norm = accelerator.clip_grad_norm_(list(params.values()), max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")  # DeepSpeed clips itself
        _log_step({"step": step + 1, "lr": lr, "grad_norm": grad_norm, **totals}, writer, history, cfg, bar)
        if (step + 1) % cfg.runtime.save_every == 0 or step + 1 == cfg.steps:
            _save(ckpt_dir, step + 1, accelerator, wrapped, optimizer, history)
        if stop_after_step is not None and stop_after_step <= step + 1 < cfg.steps:
            raise TrainingInterrupted(f"{desc}: stopped after step {step + 1} on request")
    model.eval()
    return history
