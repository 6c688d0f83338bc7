"""Version shims that let LLaVA-1.5's code run on transformers 4.37 to 5.x and recent DeepSpeed.

:mod:`~llava_patch.compat.trainer` (LLaVA's trainer and its command line) and
:mod:`~llava_patch.compat.quantization` (``--bits 4/8``, ``load_4bit/load_8bit``). The argument filter of
``generate()`` sits in :mod:`llava_patch.tower.forward`, which wraps the same ``forward``.
"""
