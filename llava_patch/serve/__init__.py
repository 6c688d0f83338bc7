"""Entry points running LLaVA's serving scripts with CLIP-MoE towers."""
