"""transformers' own Llava, LLaVA-NeXT and LLaVA-OneVision with a CLIP-MoE tower; these modules patch nothing.

:mod:`~llava_patch.hf.llava` builds ``LlavaForConditionalGeneration``, :mod:`~llava_patch.hf.llava_next` the anyres
models. :class:`llava_patch.aux_loss.TowerAuxLoss` adds the tower's load-balancing loss to them.
"""
