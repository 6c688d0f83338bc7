"""Patches that make LLaVA-1.5 (``llava-torch``) build, train, save and load CLIP-MoE vision towers.

:mod:`~llava_patch.tower.registry` (tower names and the tower class), :mod:`~llava_patch.tower.mm_config` (MoE
settings in the saved config), :mod:`~llava_patch.tower.loading` (trained tower weights, no checkpoint code unless
allowed), :mod:`~llava_patch.tower.forward` (the tower's load-balancing loss; its argument filter is a version
shim living in the same wrapper), :mod:`~llava_patch.tower.lora` (adapters on the language model only) and
:mod:`~llava_patch.tower.zero3` (ZeRO-3 loads and dtypes). :func:`llava_patch.apply` applies them.
"""
