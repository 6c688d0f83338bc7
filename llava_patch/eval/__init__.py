"""Entry points running LLaVA's evaluation scripts with CLIP-MoE towers."""
