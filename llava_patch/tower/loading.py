"""``load_pretrained_model`` that keeps trained CLIP-MoE tower weights, returns the image processor and runs no
code from a checkpoint folder unless the user allows it.

The tower's parameters exist from construction, so ``from_pretrained`` restores the tower weights stored
in a LLaVA checkpoint. Checkpoints without them (a projector-only stage with ``model_base``, LoRA weights
on a base LLM without a trained tower) get the encoder weights from the CLIP-MoE checkpoint directory.
Stock LLaVA returns no image processor unless the model name contains ``llava``; this returns the tower's.
transformers 5 recreates loaded parameters with ``requires_grad=True``; ``from_pretrained`` of LLaVA models
freezes the CLIP-MoE tower again unless it was built with ``unfreeze_mm_vision_tower``.

LLaVA passes ``trust_remote_code=True`` for models whose name contains ``mpt`` (``llava/model/builder.py`` and
``llava/train/train.py``), which runs the ``*.py`` files of the checkpoint folder. The ``AutoConfig``,
``AutoModelForCausalLM`` and ``AutoTokenizer`` those modules call are replaced by guards that pass the user's
choice instead: ``False`` unless :func:`trust_remote_code` allows it (``--trust-remote-code`` of the entry
points) or ``load_pretrained_model(..., trust_remote_code=True)`` is called.
"""

import contextlib
import contextvars
import functools
import re
import sys
import types
from pathlib import Path
from typing import Any, Callable, Iterator, List, Tuple

from llava_patch.compat.quantization import quantization_kwargs
from llava_patch.patching import original_of, set_attribute, wrap
from mllm_encoder.checkpoint import tensor_names
from mllm_encoder.vision_tower import CLIPMoEVisionTower

_TOWER_KEY = "vision_tower."
TRUST_REMOTE_CODE_FLAG = "--trust-remote-code"
_GUARDED_AUTO_CLASSES = ("AutoConfig", "AutoModelForCausalLM", "AutoTokenizer")

_trust_remote_code = contextvars.ContextVar("llava_patch_trust_remote_code", default=False)


@contextlib.contextmanager
def trust_remote_code(trusted: bool) -> Iterator[None]:
    """Within the block, LLaVA's loaders may run checkpoint-folder code only if ``trusted``."""
    token = _trust_remote_code.set(bool(trusted))
    try:
        yield
    finally:
        _trust_remote_code.reset(token)


def pop_trust_remote_code_flag(argv: List[str]) -> Tuple[List[str], bool]:
    """``argv`` without ``--trust-remote-code``, and whether it was there (for entry points running LLaVA's scripts)."""
    return [arg for arg in argv if arg != TRUST_REMOTE_CODE_FLAG], TRUST_REMOTE_CODE_FLAG in argv


class RemoteCodeGuard:
    """An ``Auto*`` class whose ``from_pretrained`` gets ``trust_remote_code`` from the user, not the caller."""

    def __init__(self, auto_class: Any):
        self.auto_class = auto_class

    def from_pretrained(self, path: Any, *args: Any, **kwargs: Any) -> Any:
        trusted = _trust_remote_code.get()
        kwargs["trust_remote_code"] = trusted
        try:
            return self.auto_class.from_pretrained(path, *args, **kwargs)
        except ValueError as error:
            if trusted or "trust_remote_code" not in str(error):
                raise
            raise ValueError(
                f"{path}: loading it would run Python code from the checkpoint folder; pass "
                f"{TRUST_REMOTE_CODE_FLAG} only if you trust that code"
            ) from error

    def __getattr__(self, name: str) -> Any:
        return getattr(self.auto_class, name)


def _guard_module(module: Any) -> None:
    for name in _GUARDED_AUTO_CLASSES:
        if hasattr(module, name):
            wrap(module, name, RemoteCodeGuard)


class _GuardedTransformers(types.ModuleType):
    """``transformers`` as seen by ``llava.train.train``: every attribute, with guarded ``Auto*`` classes."""

    def __init__(self, module: types.ModuleType):
        super().__init__(module.__name__)
        self._module = module

    def __getattr__(self, name: str) -> Any:
        if name == "_module":
            raise AttributeError(name)
        value = getattr(self._module, name)
        if name in _GUARDED_AUTO_CLASSES:
            return RemoteCodeGuard(value)
        return value


def checkpoint_has_tower_weights(model_path: str) -> bool:
    """Whether the weight files of a LLaVA checkpoint directory (LoRA's ``non_lora_trainables.bin`` included)
    hold vision-tower tensors."""
    root = Path(model_path)
    patterns = ("*.safetensors", "*.index.json", "pytorch_model*.bin", "non_lora_trainables.bin")
    files = [path for pattern in patterns for path in root.glob(pattern)]
    return any(_TOWER_KEY in name for path in files for name in tensor_names(path))


def _check_model_location(path: Any, what: str) -> None:
    """Refuse a missing local directory (transformers would report a malformed Hub repo id instead).

    ``org/name`` stays a Hub id unless ``org`` is a local directory.
    """
    if path is None or Path(str(path)).expanduser().is_dir():
        return
    text = str(path)
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) and not Path(text.split("/")[0]).is_dir():
        return
    raise ValueError(f"{path}: no such model directory ({what}); give an existing LLaVA checkpoint directory")


def _check_weight_headers(path: Any) -> None:
    """Read the header of every safetensors file of a local checkpoint directory, so that a truncated or damaged
    file is named (``ValueError``) before LLaVA loads it."""
    root = Path(str(path)).expanduser() if path is not None else None
    if root is not None and root.is_dir():
        for file in sorted(root.glob("*.safetensors")):
            tensor_names(file)


def _wrap(original: Callable) -> Callable:
    @functools.wraps(original)
    def load_pretrained_model(model_path: str, model_base: Any, model_name: str, *args: Any, **kwargs: Any):
        trusted = kwargs.pop("trust_remote_code", None)
        _check_model_location(model_path, "--model-path")
        _check_model_location(model_base, "--model-base")
        for path in (model_path, model_base):
            _check_weight_headers(path)
        scope = trust_remote_code(trusted) if trusted is not None else contextlib.nullcontext()
        with scope:
            tokenizer, model, image_processor, context_len = original(
                model_path, model_base, model_name, *args, **kwargs
            )
        tower = model.get_vision_tower() if hasattr(model, "get_vision_tower") else None
        if isinstance(tower, CLIPMoEVisionTower):
            if not checkpoint_has_tower_weights(model_path):
                tower.load_source_weights()
            image_processor = tower.image_processor
        return tokenizer, model, image_processor, context_len

    return load_pretrained_model


def _wrap_from_pretrained(original: Any) -> Any:
    @functools.wraps(original)
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        model = original.__func__(cls, *args, **quantization_kwargs(kwargs))
        tower = model.get_vision_tower()
        if isinstance(tower, CLIPMoEVisionTower):
            tower.reset_trainable()
        return model

    return classmethod(from_pretrained)


def apply() -> None:
    """Replace ``load_pretrained_model`` (in ``llava.model.builder`` and modules that imported it) and
    ``from_pretrained`` of LLaVA's Llama and Mistral models (quantisation arguments, frozen tower); guard the
    ``Auto*`` classes LLaVA's builder and training script call."""
    import llava.model.builder as builder
    import llava.train.train as train_module
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM
    from llava.model.language_model.llava_mistral import LlavaMistralForCausalLM

    _guard_module(builder)
    wrap(train_module, "transformers", _GuardedTransformers)
    for model_cls in (LlavaLlamaForCausalLM, LlavaMistralForCausalLM):
        wrap(model_cls, "from_pretrained", _wrap_from_pretrained)
    wrap(builder, "load_pretrained_model", _wrap)
    patched = builder.load_pretrained_model
    original = original_of(patched)
    for module in list(sys.modules.values()):
        name = getattr(module, "__name__", "")
        if name.startswith("llava.") and getattr(module, "load_pretrained_model", None) is original:
            set_attribute(module, "load_pretrained_model", patched)
