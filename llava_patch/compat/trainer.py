"""LLaVA's trainer on transformers 4.38+ and 5.x, and its final save on machines without CUDA.

* ``llava/train/llava_trainer.py`` imports ``ALL_LAYERNORM_LAYERS`` from ``transformers.trainer``; it now lives
  in ``transformers.pytorch_utils``.
* ``LLaVATrainer._get_train_sampler()`` takes no dataset, newer Trainers pass one; ``create_optimizer()`` takes
  no model, newer Trainers may pass one.
* ``LLaVATrainer.create_optimizer`` makes empty parameter groups (e.g. no bias-free LoRA weights); DeepSpeed
  drops them, and the learning-rate scheduler of recent torch then fails on the group count. They are removed.
* ``Trainer(tokenizer=...)`` became ``processing_class`` (the old name is gone in 5.0).
* ``LLaVATrainer._save_checkpoint`` passes ``metrics`` on to ``Trainer._save_checkpoint``, which no longer takes
  it (5.0 picks the best checkpoint elsewhere); the base method accepts and drops it again.
* ``safe_save_model_for_hf_trainer`` calls ``torch.cuda.synchronize()`` under DeepSpeed, which fails on CPU.
* transformers 5 renamed ``--warmup_ratio`` (now a fractional ``--warmup_steps``) and ``--evaluation_strategy``
  (``--eval_strategy``); :func:`translate_arguments` rewrites command lines written for LLaVA's versions.
* transformers < 4.39 fills the ZeRO-3 ``"auto"`` ``stage3_prefetch_bucket_size`` with a float
  (``0.9 * hidden**2``) that DeepSpeed >= 0.14 rejects; it is rounded to an integer.
"""

import dataclasses
import functools
import inspect
from typing import Any, Callable, List

import torch

from llava_patch.patching import set_attribute, swapped, wrap


def _provide_layernorm_layers() -> None:
    import transformers.trainer

    if not hasattr(transformers.trainer, "ALL_LAYERNORM_LAYERS"):
        from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS

        set_attribute(transformers.trainer, "ALL_LAYERNORM_LAYERS", ALL_LAYERNORM_LAYERS)


def _tokenizer_as_processing_class(original: Callable) -> Callable:
    from transformers import Trainer

    takes_tokenizer = "tokenizer" in inspect.signature(Trainer.__init__).parameters

    @functools.wraps(original)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if not takes_tokenizer and "tokenizer" in kwargs:
            kwargs["processing_class"] = kwargs.pop("tokenizer")
        original(self, *args, **kwargs)

    return __init__


def _sampler_without_dataset(original: Callable) -> Callable:
    @functools.wraps(original)
    def _get_train_sampler(self, train_dataset: Any = None):
        return original(self)

    return _get_train_sampler


def _optimizer_without_empty_groups(original: Callable) -> Callable:
    @functools.wraps(original)
    def create_optimizer(self, model: Any = None):
        optimizer = original(self)
        optimizer.param_groups = [group for group in optimizer.param_groups if group["params"]]
        return optimizer

    return create_optimizer


def _save_without_cuda(original: Callable) -> Callable:
    @functools.wraps(original)
    def safe_save_model_for_hf_trainer(trainer: Any, output_dir: str) -> None:
        if torch.cuda.is_available():
            return original(trainer=trainer, output_dir=output_dir)
        with swapped(torch.cuda, "synchronize", lambda *args, **kwargs: None):
            return original(trainer=trainer, output_dir=output_dir)

    return safe_save_model_for_hf_trainer


def _checkpoint_save_accepting_metrics(original: Callable) -> Callable:
    @functools.wraps(original)
    def _save_checkpoint(self, model: Any, trial: Any, metrics: Any = None) -> None:
        return original(self, model, trial)

    return _save_checkpoint


_RENAMED_ARGUMENTS = {"warmup_ratio": "warmup_steps", "evaluation_strategy": "eval_strategy"}


def translate_arguments(argv: List[str]) -> List[str]:
    """Rename ``TrainingArguments`` flags that this transformers version no longer knows."""
    from transformers import TrainingArguments

    fields = {field.name for field in dataclasses.fields(TrainingArguments)}
    renames = {old: new for old, new in _RENAMED_ARGUMENTS.items() if old not in fields and new in fields}
    translated = []
    for arg in argv:
        name, sep, value = arg[2:].partition("=")
        if arg.startswith("--") and name in renames:
            arg = f"--{renames[name]}{sep}{value}"
        translated.append(arg)
    return translated


_BUCKET_KEYS = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")


def _integer_bucket_sizes(original: Callable) -> Callable:
    @functools.wraps(original)
    def trainer_config_finalize(self, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        zero = self.config.get("zero_optimization", {})
        for key in _BUCKET_KEYS:
            if isinstance(zero.get(key), float):
                zero[key] = int(zero[key])

    return trainer_config_finalize


def apply() -> None:
    """Patch ``transformers``' DeepSpeed config and checkpoint save, then ``llava.train.llava_trainer`` and
    ``llava.train.train``."""
    from transformers import Trainer
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    _provide_layernorm_layers()  # before LLaVA's trainer module is imported: it fails to import without
    wrap(HfTrainerDeepSpeedConfig, "trainer_config_finalize", _integer_bucket_sizes)
    if "metrics" not in inspect.signature(Trainer._save_checkpoint).parameters:
        wrap(Trainer, "_save_checkpoint", _checkpoint_save_accepting_metrics)
    import llava.train.llava_trainer as llava_trainer
    import llava.train.train as train_module

    trainer_cls = llava_trainer.LLaVATrainer
    wrap(trainer_cls, "__init__", _tokenizer_as_processing_class)
    wrap(trainer_cls, "_get_train_sampler", _sampler_without_dataset)
    wrap(trainer_cls, "create_optimizer", _optimizer_without_empty_groups)
    wrap(train_module, "safe_save_model_for_hf_trainer", _save_without_cuda)
