"""How LLaVA, lmms-eval and VLMEvalKit turn a free-form answer into yes / no, and how each aggregates POPE.

Three evaluation stacks score the same yes/no benchmarks differently. This module restates, independently,
each stack's answer parsing and its POPE metric definitions (sources and examples: ``docs/evaluation.md``):

* ``llava``: LLaVA-1.5's ``llava/eval/eval_pope.py`` for POPE, MME's official ``eval_tool/calculation.py``
  (reached through LLaVA's ``convert_answer_to_mme.py``) for MME;
* ``lmms-eval``: ``lmms_eval/tasks/pope/utils.py`` and ``lmms_eval/tasks/mme/utils.py``;
* ``vlmevalkit``: ``vlmeval/dataset/utils/yorn.py`` (``YOrN_Extraction``, ``POPE_rating``, ``MME_rating``) with
  its default exact matching (no LLM judge for the answers it cannot parse).

A parser returns ``"yes"``, ``"no"`` or ``"other"`` (an answer the protocol cannot read; always wrong).
"""

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Generic, List, Optional, Sequence, Tuple, TypeVar

PROTOCOLS = ("llava", "lmms-eval", "vlmevalkit")
YES, NO, OTHER = "yes", "no", "other"

Parser = Callable[[str], str]


def llava_pope_parse(text: str) -> str:
    """LLaVA's ``eval_pope.py``: "no" when the first sentence has the word ``No``, ``no`` or ``not``, else "yes".

    The first sentence is the text before the first '.', commas are removed and words are split on single
    spaces; an answer is never "other" (an empty answer is "yes").
    """
    words = text.split(".")[0].replace(",", "").split(" ")
    return NO if ("No" in words or "not" in words or "no" in words) else YES


def mme_calculation_parse(text: str) -> str:
    """MME's ``calculation.py``: lower-cased text that is "yes"/"no", else "yes" or "no" in its first 4 characters."""
    text = text.lower()
    if text in (YES, NO):
        return text
    if YES in text[:4]:
        return YES
    if NO in text[:4]:
        return NO
    return OTHER


def lmms_eval_pope_parse(text: str) -> str:
    """lmms-eval's ``pope_process_results``: the lower-cased, stripped answer must be exactly "yes" or "no"."""
    text = text.lower().strip()
    return text if text in (YES, NO) else OTHER


def lmms_eval_mme_parse(text: str) -> str:
    """lmms-eval's ``parse_pred_ans``: lower-case, strip, drop every '.', then exact yes/no, then 'y'/'n', then
    "yes"/"no" in the first 4 characters."""
    text = text.lower().strip().replace(".", "")
    if text in (YES, NO):
        return text
    if len(text) == 1:
        return {"y": YES, "n": NO}.get(text, OTHER)
    if YES in text[:4]:
        return YES
    if NO in text[:4]:
        return NO
    return OTHER


# VLMEvalKit's process_punctuation (vlmeval/smp/misc.py), restated.
_VLMEVAL_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`")
_VLMEVAL_PUNCTUATION += (",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# VLMEvalKit's period pattern, (?<!\d)\.(?!\d) since its commit 928a95b0 (2025-05-13): a '.' with no digit on
# either side is removed; it passes re.UNICODE (32) as the count argument, so at most 32 of them.
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")
_VLMEVAL_PERIOD_COUNT = int(re.UNICODE)


def _vlmevalkit_punctuation(text: str) -> str:
    """Each punctuation mark is deleted when it touches a space (or the text has a digit,digit), else spaced."""
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _VLMEVAL_PUNCTUATION:
        touches_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if delete_all or touches_space else " ")
    return _PERIOD.sub("", out, count=_VLMEVAL_PERIOD_COUNT)


def vlmevalkit_parse(text: str) -> str:
    """VLMEvalKit's ``YOrN_Extraction``: among the lower-cased words, "yes" without "no" or "no" without "yes"."""
    words = _vlmevalkit_punctuation(text.lower()).split()
    has_yes, has_no = YES in words, NO in words
    if has_yes and not has_no:
        return YES
    if has_no and not has_yes:
        return NO
    return OTHER


POPE_PARSERS: Dict[str, Parser] = {
    "llava": llava_pope_parse,
    "lmms-eval": lmms_eval_pope_parse,
    "vlmevalkit": vlmevalkit_parse,
}
MME_PARSERS: Dict[str, Parser] = {
    "llava": mme_calculation_parse,
    "lmms-eval": lmms_eval_mme_parse,
    "vlmevalkit": vlmevalkit_parse,
}


def check_protocol(protocol: str) -> str:
    """Return ``protocol`` or raise a ValueError naming the known ones."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    return protocol


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, 0.0 when the denominator is 0 (as lmms-eval and VLMEvalKit define it)."""
    return float(numerator) / float(denominator) if denominator else 0.0


@dataclass
class BinaryCounts:
    """Parsed answers against yes/no ground truth; ``other_yes``/``other_no``: unreadable answers by truth."""

    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0
    other_yes: int = 0
    other_no: int = 0

    @classmethod
    def count(cls, predictions: Sequence[str], labels: Sequence[str]) -> "BinaryCounts":
        """Count (prediction, label) pairs; "yes" is the positive class."""
        counts = cls()
        for prediction, label in zip(predictions, labels):
            if prediction == OTHER:
                counts.other_yes += label == YES
                counts.other_no += label == NO
            elif prediction == YES:
                counts.tp += label == YES
                counts.fp += label == NO
            else:
                counts.tn += label == NO
                counts.fn += label == YES
        return counts

    @property
    def total(self) -> int:
        """Number of scored answers."""
        return self.tp + self.fp + self.tn + self.fn + self.other_yes + self.other_no

    @property
    def num_other(self) -> int:
        """Answers the protocol could not read as yes or no."""
        return self.other_yes + self.other_no

    def confusion(self) -> Dict[str, int]:
        """The confusion matrix of the readable answers: ``tp``, ``fp``, ``tn`` and ``fn``."""
        return {"tp": self.tp, "fp": self.fp, "tn": self.tn, "fn": self.fn}


def pope_metrics(counts: BinaryCounts, protocol: str) -> Dict[str, Optional[float]]:
    """Accuracy, precision, recall, F1 and yes-ratio as ``protocol`` defines them (fractions; see below).

    An unreadable answer is wrong for accuracy everywhere. For recall, lmms-eval ignores it (its false negatives
    are answers that are exactly "no") and VLMEvalKit counts it as "no" (a false negative when the truth is yes).
    The yes-ratio is the share of "yes" predictions for LLaVA, the share of "yes" ground truth for lmms-eval, and
    not reported by VLMEvalKit (None).
    """
    check_protocol(protocol)
    c = counts
    false_negatives = c.fn + (c.other_yes if protocol == "vlmevalkit" else 0)
    precision, recall = ratio(c.tp, c.tp + c.fp), ratio(c.tp, c.tp + false_negatives)
    yes_ratio: Optional[float] = None
    if protocol == "llava":
        yes_ratio = ratio(c.tp + c.fp, c.total)
    elif protocol == "lmms-eval":
        yes_ratio = ratio(c.tp + c.fn + c.other_yes, c.total)
    return {
        "accuracy": ratio(c.tp + c.tn, c.total),
        "precision": precision,
        "recall": recall,
        "f1": ratio(2 * precision * recall, precision + recall),
        "yes_ratio": yes_ratio,
    }


def binary_metrics(predictions: Sequence[str], labels: Sequence[str]) -> Dict[str, Any]:
    """Confusion counts and metrics of yes/no predictions with "yes" as the positive class (LLaVA's definitions,
    0/0 -> 0.0): what LLaVA's POPE script reports, and MME's precision and recall."""
    counts = BinaryCounts.count(predictions, labels)
    return {**counts.confusion(), **pope_metrics(counts, "llava")}


@dataclass
class Disagreement:
    """One answer that the protocols read differently."""

    location: str
    text: str
    truth: str
    parses: Dict[str, str]


def find_disagreements(items: Sequence[Tuple[str, str, str]], parsers: Dict[str, Parser]) -> List[Disagreement]:
    """The (location, answer text, ground truth) items on which ``parsers`` do not all agree, in order."""
    found = []
    for location, text, truth in items:
        parses = {name: parse(text) for name, parse in parsers.items()}
        if len(set(parses.values())) > 1:
            found.append(Disagreement(location, text, truth, parses))
    return found


ResultT = TypeVar("ResultT")


@dataclass
class ProtocolComparison(Generic[ResultT]):
    """The three protocols on the same answers, and the answers they read differently."""

    results: Dict[str, ResultT]
    num_scored: int
    disagreements: List[Disagreement]
    warnings: List[str] = field(default_factory=list)

    def to_dict(self, max_examples: int = 100) -> Dict[str, Any]:
        """Every number of every protocol, the disagreement count and the first ``max_examples`` of them."""
        return {
            "protocols": {name: result.to_dict() for name, result in self.results.items()},
            "num_scored": self.num_scored,
            "num_disagreements": len(self.disagreements),
            "disagreements": [asdict(d) for d in self.disagreements[:max_examples]],
            "warnings": self.warnings,
        }


def compare_protocols(
    answers: Any, score: Callable[[Any, str], ResultT], parsers: Dict[str, Parser]
) -> ProtocolComparison[ResultT]:
    """Score checked ``answers`` (with ``items`` and ``warnings``) under every protocol of ``parsers`` with
    ``score(answers, protocol)``, and list the answers that the parsers read differently."""
    items = answers.items
    results = {protocol: score(answers, protocol) for protocol in parsers}
    warnings = list(answers.warnings)  # plus each protocol's own (e.g. where its tool would have raised)
    warnings += [w for result in results.values() for w in result.warnings if w not in answers.warnings]
    return ProtocolComparison(
        results=results,
        num_scored=len(items),
        disagreements=find_disagreements(items, parsers),
        warnings=warnings,
    )
