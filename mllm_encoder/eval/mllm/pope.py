"""POPE scoring under LLaVA-1.5's protocol (the default), lmms-eval's or VLMEvalKit's, with the checks they lack.

LLaVA's protocol (``llava/eval/eval_pope.py``): for each annotation file ``coco_pope_<split>.json`` (JSON
lines: ``text``, ``image``, ``label``), the questions of LLaVA's question file whose ``category`` is ``<split>``
are paired, in file order, with the annotation lines. An answer is "no" when its first sentence contains the
word ``No``, ``not`` or ``no``, else "yes". Per split: TP/FP/TN/FN with "yes" as the positive class, accuracy,
precision, recall, F1 and the yes-ratio; the headline number is the mean F1 over the splits.
lmms-eval and VLMEvalKit parse answers differently and report the F1 pooled over all answers (plus a per-split
breakdown); see :mod:`mllm_encoder.eval.mllm.protocols`. All three are computed from the same pairing here.

LLaVA pairs the *answers* by position; here answers are joined to questions by ``question_id`` and the
questions are paired by position, which is the same thing for a complete answer file in question order (what
``model_vqa_loader`` and ``clip-moe eval answer`` write) and stays right when it is not. Everything LLaVA's
script would silently get wrong is counted and warned about, naming the file and line: question/annotation
lines that do not line up (e.g. annotation files from another POPE commit), missing, duplicate or unknown
answers, answers to a different prompt, answers whose text is not a string. Missing and malformed answers are
never scored: they are left out of the confusion matrix and counted.
"""

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from mllm_encoder.eval.mllm.jsonl import JsonlRecord, PathLike, read_jsonl, require_fields
from mllm_encoder.eval.mllm.problems import (
    NON_STRING_FAILURES,
    AnswerChecks,
    copy_checks,
    malformed_text,
    report_problems,
    report_tool_failures,
)
from mllm_encoder.eval.mllm.protocols import (
    POPE_PARSERS,
    BinaryCounts,
    ProtocolComparison,
    check_protocol,
    compare_protocols,
    pope_metrics,
    ratio,
)

ANNOTATION_PREFIX = "coco_pope_"


@dataclass
class PopeSplitResult:
    """Counts and metrics of one POPE split, or of all answers pooled (``split == "all"``); fractions in [0, 1].

    ``num_other``: answers the protocol cannot read as yes/no (always 0 for LLaVA's). ``yes_ratio`` is None
    where the protocol reports none (VLMEvalKit).
    """

    split: str
    annotation_file: str
    num_questions: int
    num_answered: int
    num_missing: int
    num_empty: int
    num_malformed: int
    num_other: int
    tp: int
    fp: int
    tn: int
    fn: int
    accuracy: float
    precision: float
    recall: float
    f1: float
    yes_ratio: Optional[float]


@dataclass
class PopeChecks(AnswerChecks):
    """Every data problem found pairing an answer file with the questions and annotations (see the docstring)."""

    num_prompt_mismatch: int = 0
    num_misaligned: int = 0


@dataclass
class PopeResult(PopeChecks):
    """The whole POPE evaluation under one protocol: per-split and pooled results and every data problem found."""

    splits: Dict[str, PopeSplitResult] = field(default_factory=dict)
    protocol: str = "llava"
    overall: Optional[PopeSplitResult] = None
    # answers on which the protocol's own tool raises ("file:line: why"): it would not have scored the file
    tool_failures: List[str] = field(default_factory=list)

    @property
    def mean_f1(self) -> float:
        """LLaVA's headline POPE number (as a fraction): the mean F1 over the splits."""
        return ratio(sum(s.f1 for s in self.splits.values()), len(self.splits))

    @property
    def mean_accuracy(self) -> float:
        """Mean accuracy over the splits."""
        return ratio(sum(s.accuracy for s in self.splits.values()), len(self.splits))

    @property
    def headline_f1(self) -> float:
        """The number the protocol reports: LLaVA's mean F1 over splits, else the F1 over all answers pooled."""
        if self.protocol == "llava" or self.overall is None:
            return self.mean_f1
        return self.overall.f1

    @property
    def num_missing(self) -> int:
        """Questions of the scored splits without an answer."""
        return sum(s.num_missing for s in self.splits.values())

    @property
    def num_malformed(self) -> int:
        """Answers whose text is not a string (not scored)."""
        return sum(s.num_malformed for s in self.splits.values())

    def to_dict(self) -> Dict[str, Any]:
        """Every number, JSON-serialisable."""
        out = asdict(self)
        out.update(mean_f1=self.mean_f1, mean_accuracy=self.mean_accuracy, headline_f1=self.headline_f1)
        out.update(num_missing=self.num_missing, num_malformed=self.num_malformed)
        return out


@dataclass
class PopeAnswer:
    """One scored answer: where it is, its text and the ground truth of its question."""

    split: str
    location: str
    text: str
    label: str


@dataclass
class _SplitAnswers:
    annotation_file: str
    num_questions: int
    answers: List[PopeAnswer]
    num_missing: int
    num_malformed: int
    non_string: List[PopeAnswer] = field(default_factory=list)  # text is str() of the answer's non-string value

    @property
    def num_empty(self) -> int:
        """Answers that are empty or white space."""
        return sum(not a.text.strip() for a in self.answers)


@dataclass
class PopeAnswers(PopeChecks):
    """An answer file paired with the questions and annotations, checked, before any protocol parses it."""

    splits: Dict[str, _SplitAnswers] = field(default_factory=dict)
    tool_failures: Dict[str, List[str]] = field(default_factory=dict)  # per protocol, see PopeResult

    @property
    def items(self) -> List[Tuple[str, str, str]]:
        """(location, text, ground truth) of every scored answer, split by split."""
        return [(a.location, a.text, a.label) for split in self.splits.values() for a in split.answers]


def load_annotations(annotation_dir: PathLike) -> Dict[str, Tuple[Path, List[JsonlRecord]]]:
    """Read the ``coco_pope_<split>.json`` files of ``annotation_dir`` (sorted by split), checking labels."""
    files = sorted(Path(annotation_dir).glob(f"{ANNOTATION_PREFIX}*.json"))
    if not files:
        raise ValueError(f"{annotation_dir}: no {ANNOTATION_PREFIX}<split>.json annotation files")
    annotations = {}
    for path in files:
        records = read_jsonl(path)
        for record in records:
            require_fields(path, record, ("text", "label"))
            if record.data["label"] not in ("yes", "no"):
                raise ValueError(f"{path}:{record.line}: label must be 'yes' or 'no', got {record.data['label']!r}")
        annotations[path.stem[len(ANNOTATION_PREFIX) :]] = (path, records)
    return annotations


def load_questions(question_file: PathLike) -> List[JsonlRecord]:
    """Read LLaVA's POPE question file: ``question_id`` (unique), ``text`` and ``category`` are required."""
    questions = read_jsonl(question_file)
    seen: Dict[Any, int] = {}
    for record in questions:
        require_fields(question_file, record, ("question_id", "text", "category"))
        question_id = record.data["question_id"]
        if not isinstance(question_id, (int, str)) or isinstance(question_id, bool):
            raise ValueError(f"{question_file}:{record.line}: question_id must be an integer or a string")
        for name in ("text", "category"):
            if not isinstance(record.data[name], str):
                raise ValueError(f"{question_file}:{record.line}: {name} must be a string")
        if question_id in seen:
            raise ValueError(
                f"{question_file}:{record.line}: duplicate question_id {question_id!r} "
                f"(first on line {seen[question_id]})"
            )
        seen[question_id] = record.line
    return questions


def _index_answers(result_file: PathLike, questions: List[JsonlRecord], result: PopeAnswers) -> Dict[Any, JsonlRecord]:
    """Answers by question id (first kept); unknown, duplicate and wrong-prompt answers counted, warned."""
    question_text = {q.data["question_id"]: q.data["text"] for q in questions}
    answers: Dict[Any, JsonlRecord] = {}
    unknown, duplicate, mismatch = [], [], []
    records = read_jsonl(result_file)
    for record in records:
        require_fields(result_file, record, ("question_id", "text"))
        question_id = record.data["question_id"]
        if not isinstance(question_id, (int, str)) or question_id not in question_text:
            unknown.append(f"{result_file}:{record.line} (question_id {question_id!r})")
        elif question_id in answers:
            duplicate.append(
                f"{result_file}:{record.line} (question_id {question_id!r}, kept line {answers[question_id].line})"
            )
        else:
            answers[question_id] = record
            prompt = record.data.get("prompt")
            if prompt is not None and prompt != question_text[question_id]:
                mismatch.append(f"{result_file}:{record.line} (question_id {question_id!r})")
    if records and not answers:
        raise ValueError(
            f"{result_file}: none of its {len(records)} question ids is in the question file; wrong files?"
        )
    result.num_answers, result.num_unknown = len(records), len(unknown)
    result.num_duplicate, result.num_prompt_mismatch = len(duplicate), len(mismatch)
    report_problems(
        result.warnings, f"{len(unknown)} answers to question ids not in the question file (not scored)", unknown
    )
    report_problems(result.warnings, f"{len(duplicate)} duplicate answers (the first is scored)", duplicate)
    report_problems(result.warnings, f"{len(mismatch)} answers whose prompt differs from the question's text", mismatch)
    _check_answer_order(result_file, questions, answers, result.warnings)
    return answers


def _check_answer_order(
    result_file: PathLike, questions: List[JsonlRecord], answers: Dict[Any, JsonlRecord], warnings: List[str]
) -> None:
    """Warn when answers are not in question order: LLaVA's script, which pairs by order, would mis-score."""
    answer_lines = [answers[q.data["question_id"]].line for q in questions if q.data["question_id"] in answers]
    out_of_order = [f"{result_file}:{b}" for a, b in zip(answer_lines, answer_lines[1:]) if b < a]
    report_problems(
        warnings,
        "answers are not in question-file order (scored by question id here; LLaVA's eval_pope.py would pair "
        "them with the wrong annotation lines)",
        out_of_order,
    )


def _alignment_problems(
    question_file: PathLike,
    questions: List[JsonlRecord],
    annotation_path: Path,
    annotations: List[JsonlRecord],
) -> List[str]:
    """Pairs whose image, question text or question id (up to one constant offset per split) disagree."""
    problems = []
    offset: Optional[int] = None
    for question, annotation in zip(questions, annotations):
        q, a = question.data, annotation.data
        where = f"{question_file}:{question.line} vs {annotation_path}:{annotation.line}"
        question_text = q["text"].split("\n", 1)[0].strip()
        if question_text != str(a["text"]).strip():
            problems.append(f"{where}: question {question_text!r} != annotation {a['text']!r}")
        elif "image" in q and "image" in a and q["image"] != a["image"]:
            problems.append(f"{where}: image {q['image']!r} != {a['image']!r}")
        elif "question_id" in a:
            if isinstance(q["question_id"], int) and isinstance(a["question_id"], int):
                delta = q["question_id"] - a["question_id"]
                offset = delta if offset is None else offset
                ids_disagree = delta != offset
            else:
                ids_disagree = q["question_id"] != a["question_id"]
            if ids_disagree:
                problems.append(f"{where}: question_id {q['question_id']!r} vs {a['question_id']!r}")
    return problems


def _pair_split(
    split: str,
    questions: List[JsonlRecord],
    annotation_path: Path,
    annotations: List[JsonlRecord],
    answers: Dict[Any, JsonlRecord],
    result_file: PathLike,
    malformed: List[str],
) -> _SplitAnswers:
    """Question i is paired with annotation line i; unanswered questions and non-string answers are counted."""
    paired, non_string, missing = [], [], 0
    for question, annotation in zip(questions, annotations):
        answer = answers.get(question.data["question_id"])
        if answer is None:
            missing += 1
            continue
        location = f"{result_file}:{answer.line}"
        problem = malformed_text(result_file, answer)
        if problem is not None:
            malformed.append(problem)
            non_string.append(PopeAnswer(split, location, str(answer.data["text"]), annotation.data["label"]))
            continue
        paired.append(PopeAnswer(split, location, answer.data["text"], annotation.data["label"]))
    return _SplitAnswers(
        annotation_file=str(annotation_path),
        num_questions=min(len(questions), len(annotations)),
        answers=paired,
        num_missing=missing,
        num_malformed=len(non_string),
        non_string=non_string,
    )


def load_pope_answers(annotation_dir: PathLike, question_file: PathLike, result_file: PathLike) -> PopeAnswers:
    """Pair a LLaVA-format answer file with POPE's questions and annotations, reporting every data problem."""
    annotations = load_annotations(annotation_dir)
    questions = load_questions(question_file)
    result = PopeAnswers()
    answers = _index_answers(result_file, questions, result)
    by_split: Dict[str, List[JsonlRecord]] = {}
    for question in questions:
        by_split.setdefault(question.data["category"], []).append(question)
    orphans = sorted(set(by_split) - set(annotations))
    report_problems(
        result.warnings,
        f"question categories without a {ANNOTATION_PREFIX}<category>.json annotation file (not scored)",
        orphans,
    )
    malformed: List[str] = []
    for split, (path, split_annotations) in annotations.items():
        split_questions = by_split.get(split, [])
        num_q, num_a = len(split_questions), len(split_annotations)
        if not num_q:
            report_problems(
                result.warnings, f"{path}: no question of {question_file} has category {split!r}", ["not scored"]
            )
            continue
        if num_q != num_a:
            report_problems(
                result.warnings,
                f"split {split!r}: {num_q} questions in {question_file} but {num_a} lines in {path} "
                f"(only the first {min(num_q, num_a)} are paired)",
                ["annotation files from another POPE commit? LLaVA's question file matches commit e3e39262"],
            )
        misaligned = _alignment_problems(question_file, split_questions, path, split_annotations)
        result.num_misaligned += len(misaligned)
        report_problems(
            result.warnings, f"split {split!r}: {len(misaligned)} question/annotation lines do not line up", misaligned
        )
        result.splits[split] = _pair_split(
            split, split_questions, path, split_annotations, answers, result_file, malformed
        )
    report_problems(
        result.warnings,
        f"{len(malformed)} answers whose text is not a string (a data problem; not scored, except by VLMEvalKit's "
        "protocol, which reads str() of them)",
        malformed,
    )
    result.tool_failures = {
        protocol: [f"{problem}: {why}" for problem in malformed]
        for protocol, why in NON_STRING_FAILURES["pope"].items()
    }
    _report_missing(result, result_file)
    return result


def _split_result(split: str, annotation_file: str, scored: _SplitAnswers, protocol: str) -> PopeSplitResult:
    """Parse the answers with ``protocol`` and compute its metrics (``scored`` may pool several splits).

    VLMEvalKit's protocol also scores the answers whose text is not a string, as ``str()`` of it (as VLMEvalKit
    does); the others leave them out."""
    parse = POPE_PARSERS[protocol]
    answers = scored.answers + (scored.non_string if protocol == "vlmevalkit" else [])
    counts = BinaryCounts.count([parse(a.text) for a in answers], [a.label for a in answers])
    return PopeSplitResult(
        split=split,
        annotation_file=annotation_file,
        num_questions=scored.num_questions,
        num_answered=len(answers),
        num_missing=scored.num_missing,
        num_empty=scored.num_empty,
        num_malformed=scored.num_malformed,
        num_other=counts.num_other,
        **counts.confusion(),
        **pope_metrics(counts, protocol),
    )


def score_pope(answers: PopeAnswers, protocol: str = "llava") -> PopeResult:
    """Score paired answers under ``protocol`` (``llava``, ``lmms-eval`` or ``vlmevalkit``)."""
    check_protocol(protocol)
    splits = {name: _split_result(name, s.annotation_file, s, protocol) for name, s in answers.splits.items()}
    pooled = _SplitAnswers(
        annotation_file="",
        num_questions=sum(s.num_questions for s in answers.splits.values()),
        answers=[a for s in answers.splits.values() for a in s.answers],
        num_missing=sum(s.num_missing for s in answers.splits.values()),
        num_malformed=sum(s.num_malformed for s in answers.splits.values()),
        non_string=[a for s in answers.splits.values() for a in s.non_string],
    )
    overall = _split_result("all", "", pooled, protocol)
    result = PopeResult(splits=splits, protocol=protocol, overall=overall, **copy_checks(answers, PopeChecks))
    result.tool_failures = list(answers.tool_failures.get(protocol, []))
    report_tool_failures(result.warnings, protocol, result.tool_failures)
    return result


def evaluate_pope(
    annotation_dir: PathLike, question_file: PathLike, result_file: PathLike, protocol: str = "llava"
) -> PopeResult:
    """Score a LLaVA-format answer file on POPE under ``protocol`` (see the module docstring)."""
    check_protocol(protocol)
    return score_pope(load_pope_answers(annotation_dir, question_file, result_file), protocol)


def compare_pope_protocols(
    annotation_dir: PathLike, question_file: PathLike, result_file: PathLike
) -> ProtocolComparison[PopeResult]:
    """Score one answer file under every protocol (read and checked once) and list where they disagree."""
    return compare_protocols(load_pope_answers(annotation_dir, question_file, result_file), score_pope, POPE_PARSERS)


def _report_missing(result: PopeAnswers, result_file: PathLike) -> None:
    """Warn about unanswered questions (not scored) and empty answers (which the protocols read differently)."""
    missing = [f"{name}: {s.num_missing} of {s.num_questions}" for name, s in result.splits.items() if s.num_missing]
    report_problems(result.warnings, f"{result_file}: questions without an answer (left out of the metrics)", missing)
    empty = [f"{name}: {s.num_empty}" for name, s in result.splits.items() if s.num_empty]
    report_problems(
        result.warnings,
        f"{result_file}: empty answers (LLaVA's protocol reads them as 'yes', lmms-eval's and VLMEvalKit's as "
        "unreadable)",
        empty,
    )
