"""Evaluation: zero-shot retrieval and classification of encoders, router analysis, and MLLM benchmarks
(MME, POPE) in ``mllm_encoder.eval.mllm``."""
