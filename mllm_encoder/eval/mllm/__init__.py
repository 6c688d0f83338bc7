"""MLLM benchmarks (POPE, MME) with LLaVA's published protocols, and a resumable answering step."""

from mllm_encoder.eval.mllm.answering import answer_questions, get_chunk, merge_answer_files
from mllm_encoder.eval.mllm.mme import evaluate_mme
from mllm_encoder.eval.mllm.pope import evaluate_pope
from mllm_encoder.eval.mllm.protocols import llava_pope_parse, mme_calculation_parse

__all__ = [
    "answer_questions",
    "evaluate_mme",
    "evaluate_pope",
    "get_chunk",
    "llava_pope_parse",
    "merge_answer_files",
    "mme_calculation_parse",
]
