"""LLaVA's trainer on transformers 4.38+ and 5.x, and its final save on machines without CUDA.

* ``llava/train/llava_trainer.py`` imports ``ALL_LAYERNORM_LAYERS`` from ``transformers.trainer``; it now lives
  in ``transformers.pytorch_utils``.
* ``LLaVATrainer._get_train_sampler()`` takes no dataset, newer Trainers pass one; ``create_optimizer()`` takes
  no model, newer Trainers may pass one.
* ``Trainer(tokenizer=...)`` became ``processing_class`` (the old name is gone in 5.0).
* ``safe_save_model_for_hf_trainer`` calls ``torch.cuda.synchronize()`` under DeepSpeed, which fails on CPU.
* transformers < 4.39 fills the ZeRO-3 ``"auto"`` ``stage3_prefetch_bucket_size`` with a float
  (``0.9 * hidden**2``) that DeepSpeed >= 0.14 rejects; it is rounded to an integer.
"""

import functools
import inspect
from typing import Any

import torch


def _provide_layernorm_layers() -> None:
    import transformers.trainer

    if not hasattr(transformers.trainer, "ALL_LAYERNORM_LAYERS"):
        from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS

        transformers.trainer.ALL_LAYERNORM_LAYERS = ALL_LAYERNORM_LAYERS


def _patch_trainer_class(trainer_cls: type) -> None:
    from transformers import Trainer

    takes_tokenizer = "tokenizer" in inspect.signature(Trainer.__init__).parameters
    original_init = trainer_cls.__init__
    original_sampler = trainer_cls._get_train_sampler
    original_create_optimizer = trainer_cls.create_optimizer

    @functools.wraps(original_init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if not takes_tokenizer and "tokenizer" in kwargs:
            kwargs["processing_class"] = kwargs.pop("tokenizer")
        original_init(self, *args, **kwargs)

    @functools.wraps(original_sampler)
    def _get_train_sampler(self, train_dataset: Any = None):
        return original_sampler(self)

    @functools.wraps(original_create_optimizer)
    def create_optimizer(self, model: Any = None):
        return original_create_optimizer(self)

    trainer_cls.__init__ = __init__
    trainer_cls._get_train_sampler = _get_train_sampler
    trainer_cls.create_optimizer = create_optimizer


def _patch_final_save(train_module: Any) -> None:
    original_save = train_module.safe_save_model_for_hf_trainer

    @functools.wraps(original_save)
    def safe_save_model_for_hf_trainer(trainer: Any, output_dir: str) -> None:
        if torch.cuda.is_available():
            return original_save(trainer=trainer, output_dir=output_dir)
        synchronize = torch.cuda.synchronize
        torch.cuda.synchronize = lambda *args, **kwargs: None
        try:
            return original_save(trainer=trainer, output_dir=output_dir)
        finally:
            torch.cuda.synchronize = synchronize

    train_module.safe_save_model_for_hf_trainer = safe_save_model_for_hf_trainer


_BUCKET_KEYS = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")


def _patch_deepspeed_auto_values() -> None:
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    original = HfTrainerDeepSpeedConfig.trainer_config_finalize
    if getattr(original, "_llava_patch", False):
        return

    @functools.wraps(original)
    def trainer_config_finalize(self, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        zero = self.config.get("zero_optimization", {})
        for key in _BUCKET_KEYS:
            if isinstance(zero.get(key), float):
                zero[key] = int(zero[key])

    trainer_config_finalize._llava_patch = True
    HfTrainerDeepSpeedConfig.trainer_config_finalize = trainer_config_finalize


def apply() -> None:
    """Patch ``llava.train.llava_trainer`` and ``llava.train.train``."""
    _provide_layernorm_layers()
    _patch_deepspeed_auto_values()
    import llava.train.llava_trainer as llava_trainer

    _patch_trainer_class(llava_trainer.LLaVATrainer)
    import llava.train.train as train_module

    _patch_final_save(train_module)
