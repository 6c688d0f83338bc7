"""Data problems found while scoring: one loud warning per kind, listing its first examples, and the counts
every benchmark keeps of them."""

import copy
import logging
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Type

from mllm_encoder.eval.mllm.jsonl import JsonlRecord, PathLike

logger = logging.getLogger(__name__)


def report_problems(warnings: List[str], summary: str, examples: List[str], limit: int = 5) -> None:
    """Log ``summary`` with the first ``limit`` examples as one warning and append it to ``warnings``.

    Nothing happens when ``examples`` is empty.
    """
    if not examples:
        return
    more = f"; ... and {len(examples) - limit} more" if len(examples) > limit else ""
    message = f"{summary}: {'; '.join(examples[:limit])}{more}"
    logger.warning(message)
    warnings.append(message)


def malformed_text(path: PathLike, record: JsonlRecord) -> Optional[str]:
    """A ``file:line`` description when an answer's ``text`` is not a string (a data problem), else None."""
    text = record.data["text"]
    if isinstance(text, str):
        return None
    return f"{path}:{record.line} (text is {type(text).__name__} {text!r})"


# What each protocol's own tool does with an answer it cannot take (it raises, and scores nothing).
NON_STRING_FAILURES = {
    "pope": {
        "llava": "LLaVA's eval_pope.py raises AttributeError (text.find)",
        "lmms-eval": "lmms-eval's pope_process_results raises AttributeError (.lower())",
    },
    "mme": {
        "llava": "LLaVA's convert_answer_to_mme.py raises TypeError ('\\t'.join)",
        "lmms-eval": "lmms-eval's parse_pred_ans raises AttributeError (.lower())",
    },
}
MME_LINE_BREAK_FAILURE = (
    "MME's calculation.py raises ValueError (the answer's \\n, \\r or \\t breaks the line or tab format that "
    "LLaVA's convert_answer_to_mme.py writes)"
)


def report_tool_failures(warnings: List[str], protocol: str, failures: List[str]) -> None:
    """Warn that ``protocol``'s own tool would have raised on ``failures`` (``file[:line]: why``: answers, or an
    absent part of the benchmark) and scored nothing."""
    report_problems(
        warnings,
        f"the {protocol} protocol's own tool would not have scored this file: it raises on each of these "
        f"{len(failures)} (scored here anyway, as the table says)",
        failures,
    )


@dataclass
class AnswerChecks:
    """What joining an answer file to a benchmark's questions found: answers read, answers to questions not in
    the question file, duplicate answers, and one warning per kind of problem (a benchmark adds its own)."""

    num_answers: int = 0
    num_unknown: int = 0
    num_duplicate: int = 0
    warnings: List[str] = field(default_factory=list)


def copy_checks(answers: AnswerChecks, checks_class: Type[AnswerChecks]) -> Dict[str, Any]:
    """The ``checks_class`` fields of ``answers``, copied: what each result scored from ``answers`` carries."""
    return {entry.name: copy.copy(getattr(answers, entry.name)) for entry in fields(checks_class)}
