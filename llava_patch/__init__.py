"""Make the LLaVA-1.5 codebase (``llava-torch``) use CLIP-MoE vision towers.

``llava_patch.apply()`` does everything; importing the package changes nothing. After it:

* ``--vision_tower clip-moe`` (the default checkpoint, see :mod:`llava_patch.registry`),
  ``clip-moe:<dir>`` and any CLIP-MoE checkpoint directory build a
  :class:`mllm_encoder.vision_tower.CLIPMoEVisionTower`;
* LLaVA's training, generation and loading code runs on transformers 4.37 to 5.x
  (:mod:`llava_patch.trainer_compat`, :mod:`llava_patch.forward`, :mod:`llava_patch.quantization`);
* the tower's MoE settings are saved into the LLaVA config (:mod:`llava_patch.mm_config`) and trained
  tower weights survive ``load_pretrained_model`` (:mod:`llava_patch.loading`);
* the tower's load-balancing loss is added to the language-model loss when the tower is trained;
* DeepSpeed ZeRO-3 gets one parameter dtype (:mod:`llava_patch.zero3`);
* LoRA adapters target the language model only (:mod:`llava_patch.lora`).

Entry points: ``python -m llava_patch.train``, ``python -m llava_patch.eval.model_vqa_loader`` and
``python -m llava_patch.serve.cli``. :mod:`llava_patch.hf_llava` builds transformers' own Llava with a CLIP-MoE
tower; :mod:`llava_patch.testing` makes tiny offline checkpoints for tests. See ``docs/llava.md``.
"""

import logging

logger = logging.getLogger(__name__)

_applied = False


def apply() -> None:
    """Patch the installed ``llava`` package in place (idempotent)."""
    global _applied
    if _applied:
        return
    from llava_patch import trainer_compat

    # LLaVA's trainer module fails to import on new transformers: fix that first.
    trainer_compat.apply()
    # `llava.model` swallows import errors; importing the module directly surfaces them.
    import llava.model.language_model.llava_llama  # noqa: F401

    from llava_patch import forward, loading, lora, mm_config, quantization, registry, zero3

    registry.apply()
    mm_config.apply()
    forward.apply()
    quantization.apply()
    loading.apply()
    zero3.apply()
    lora.apply()
    _applied = True
    logger.debug("llava patched for CLIP-MoE vision towers")
