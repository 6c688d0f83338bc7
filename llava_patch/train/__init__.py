"""The entry point ``python -m llava_patch.train`` (:mod:`llava_patch.train.__main__`): LLaVA-1.5's training with
CLIP-MoE towers."""
