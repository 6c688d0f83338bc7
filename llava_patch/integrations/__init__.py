"""LLaVA checkpoints answering for other programs: :mod:`~llava_patch.integrations.answerer` for
``clip-moe eval answer`` (entry point group ``mllm_encoder.answerers``) and
:mod:`~llava_patch.integrations.lmms_eval_model`, the lmms-eval plug-in (group ``lmms_eval.models``).
"""
