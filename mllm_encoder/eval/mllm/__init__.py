"""MLLM benchmarks (POPE, MME) with LLaVA's published protocols, and a resumable answering step."""

from mllm_encoder.eval.mllm.answering import answer_questions, get_chunk, merge_answer_files
from mllm_encoder.eval.mllm.mme import evaluate_mme, parse_mme_answer
from mllm_encoder.eval.mllm.pope import evaluate_pope, normalize_pope_answer

__all__ = [
    "answer_questions",
    "evaluate_mme",
    "evaluate_pope",
    "get_chunk",
    "merge_answer_files",
    "normalize_pope_answer",
    "parse_mme_answer",
]
