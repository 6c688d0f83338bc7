"""Make the LLaVA-1.5 codebase (``llava-torch``) use CLIP-MoE vision towers.

``llava_patch.apply()`` does everything; importing the package changes nothing. Every change goes through
:mod:`llava_patch.patching` (recorded, idempotent, undone by ``patching.undo_all()``). The folder shows which part
is which:

* :mod:`llava_patch.tower`: the CLIP-MoE integration patched into LLaVA-1.5. ``--vision_tower clip-moe`` (the
  default checkpoint), ``clip-moe:<dir>`` and any CLIP-MoE checkpoint directory build a
  :class:`mllm_encoder.vision_tower.CLIPMoEVisionTower` (``registry``); the tower's MoE settings are saved into the
  LLaVA config (``mm_config``); trained tower weights survive ``load_pretrained_model`` and no checkpoint code runs
  unless allowed (``loading``); the tower's load-balancing loss is added to the language-model loss when the tower
  is trained (``forward``, with :class:`llava_patch.aux_loss.TowerAuxLoss`, which transformers' Llava* models
  install too); LoRA adapters target the language model only (``lora``); ZeRO-3 loads and dtypes (``zero3``).
* :mod:`llava_patch.compat`: version shims that let LLaVA's code run on transformers 4.37 to 5.x and recent
  DeepSpeed (``trainer``, ``quantization``; the argument filter of ``tower.forward``).
* :mod:`llava_patch.hf`: builders of transformers' own Llava / LLaVA-NeXT / OneVision with a CLIP-MoE tower (they
  patch nothing).
* :mod:`llava_patch.integrations`: the answerer of ``clip-moe eval answer`` (entry point group
  ``mllm_encoder.answerers``) and the lmms-eval plug-in (group ``lmms_eval.models``).
* Entry points, named after LLaVA's scripts: ``python -m llava_patch.train``,
  ``python -m llava_patch.eval.model_vqa_loader`` and ``python -m llava_patch.serve.cli``.

See ``docs/llava.md``.
"""

import logging
import runpy
import sys

from llava_patch.compat import trainer
from llava_patch.tower import forward, loading, lora, mm_config, registry, zero3

logger = logging.getLogger(__name__)


def apply() -> None:
    """Patch the installed ``llava`` package in place (idempotent)."""
    # LLaVA's trainer module fails to import on new transformers: fix that first.
    trainer.apply()
    # `llava.model` swallows import errors; importing the module directly surfaces them.
    import llava.model.language_model.llava_llama  # noqa: F401

    registry.apply()
    mm_config.apply()
    forward.apply()
    loading.apply()
    zero3.apply()
    lora.apply()
    logger.debug("llava patched for CLIP-MoE vision towers")


def run_llava_script(module: str) -> None:
    """Patch LLaVA, then run its script ``module`` as ``__main__`` with this process's arguments, less
    ``--trust-remote-code``, which says whether checkpoint folders may run their own code (off by default)."""
    apply()
    sys.argv[1:], trusted = loading.pop_trust_remote_code_flag(sys.argv[1:])
    with loading.trust_remote_code(trusted):
        runpy.run_module(module, run_name="__main__", alter_sys=True)
