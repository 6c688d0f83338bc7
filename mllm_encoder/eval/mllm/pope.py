"""POPE scoring with LLaVA-1.5's protocol (``llava/eval/eval_pope.py``), plus the checks that script lacks.

The protocol: for each annotation file ``coco_pope_<split>.json`` (JSON lines: ``text``, ``image``,
``label``), the questions of LLaVA's question file whose ``category`` is ``<split>`` are paired, in file
order, with the annotation lines. An answer is normalised to "no" when its first sentence (text before the
first '.'), with commas removed and split on single spaces, contains the word ``No``, ``not`` or ``no``; to
"yes" otherwise.
Per split: TP/FP/TN/FN with "yes" as the positive class, accuracy, precision, recall, F1 and the yes-ratio
(predicted "yes" / answered). The headline number is the mean F1 over the splits.

LLaVA pairs the *answers* by position; here answers are joined to questions by ``question_id`` and the
questions are paired by position, which is the same thing for a complete answer file in question order (what
``model_vqa_loader`` and ``clip-moe eval answer`` write) and stays right when it is not. Everything LLaVA's
script would silently get wrong is counted and warned about, naming the file and line: question/annotation
lines that do not line up (e.g. annotation files from another POPE commit), missing, duplicate or unknown
answers, answers to a different prompt. Missing answers are never scored: they are left out of the confusion
matrix and counted.
"""

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from mllm_encoder.eval.mllm.jsonl import JsonlRecord, PathLike, read_jsonl, require_fields
from mllm_encoder.eval.mllm.problems import report_problems

ANNOTATION_PREFIX = "coco_pope_"


def normalize_pope_answer(text: str) -> str:
    """Map a free-form answer to "yes"/"no" exactly as LLaVA's ``eval_pope.py`` does."""
    first_sentence = text.split(".")[0]
    words = first_sentence.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def _ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, 0.0 when the denominator is 0 (e.g. precision without "yes" answers)."""
    return float(numerator) / float(denominator) if denominator else 0.0


def binary_metrics(predictions: List[str], labels: List[str]) -> Dict[str, Any]:
    """Confusion counts and metrics with "yes" as the positive class (LLaVA's definitions; 0/0 -> 0.0)."""
    pairs = list(zip(predictions, labels))
    tp = sum(p == "yes" and g == "yes" for p, g in pairs)
    fp = sum(p == "yes" and g == "no" for p, g in pairs)
    tn = sum(p == "no" and g == "no" for p, g in pairs)
    fn = sum(p == "no" and g == "yes" for p, g in pairs)
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "accuracy": _ratio(tp + tn, len(pairs)),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": _ratio(tp + fp, len(pairs)),
    }


@dataclass
class PopeSplitResult:
    """Counts and metrics of one POPE split (fractions in [0, 1])."""

    split: str
    annotation_file: str
    num_questions: int
    num_answered: int
    num_missing: int
    num_empty: int
    tp: int
    fp: int
    tn: int
    fn: int
    accuracy: float
    precision: float
    recall: float
    f1: float
    yes_ratio: float


@dataclass
class PopeResult:
    """The whole POPE evaluation: per-split results, the headline mean F1 and every data problem found."""

    splits: Dict[str, PopeSplitResult]
    num_answers: int = 0
    num_unknown: int = 0
    num_duplicate: int = 0
    num_prompt_mismatch: int = 0
    num_misaligned: int = 0
    warnings: List[str] = field(default_factory=list)

    @property
    def mean_f1(self) -> float:
        """LLaVA's headline POPE number (as a fraction): the mean F1 over the splits."""
        return _ratio(sum(s.f1 for s in self.splits.values()), len(self.splits))

    @property
    def mean_accuracy(self) -> float:
        """Mean accuracy over the splits."""
        return _ratio(sum(s.accuracy for s in self.splits.values()), len(self.splits))

    @property
    def num_missing(self) -> int:
        """Questions of the scored splits without an answer."""
        return sum(s.num_missing for s in self.splits.values())

    def to_dict(self) -> Dict[str, Any]:
        """Every number, JSON-serialisable."""
        out = asdict(self)
        out["splits"] = {name: asdict(split) for name, split in self.splits.items()}
        out.update(protocol="llava-eval_pope", mean_f1=self.mean_f1, mean_accuracy=self.mean_accuracy)
        out["num_missing"] = self.num_missing
        return out


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
        if question_id in seen:
            raise ValueError(
                f"{question_file}:{record.line}: duplicate question_id {question_id!r} "
                f"(first on line {seen[question_id]})"
            )
        seen[question_id] = record.line
    return questions


def _index_answers(result_file: PathLike, questions: List[JsonlRecord], result: PopeResult) -> Dict[Any, JsonlRecord]:
    """Answers by question id (first kept); unknown, duplicate and wrong-prompt answers counted, warned."""
    question_text = {q.data["question_id"]: q.data["text"] for q in questions}
    answers: Dict[Any, JsonlRecord] = {}
    unknown, duplicate, mismatch = [], [], []
    records = read_jsonl(result_file)
    for record in records:
        require_fields(result_file, record, ("question_id", "text"))
        question_id = record.data["question_id"]
        if question_id not in question_text:
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


def _score_split(
    split: str,
    questions: List[JsonlRecord],
    annotation_path: Path,
    annotations: List[JsonlRecord],
    answers: Dict[Any, JsonlRecord],
) -> PopeSplitResult:
    """Score one split: question i is paired with annotation line i; unanswered questions are only counted."""
    predictions, labels = [], []
    missing = empty = 0
    for question, annotation in zip(questions, annotations):
        answer = answers.get(question.data["question_id"])
        if answer is None:
            missing += 1
            continue
        text = str(answer.data["text"])
        empty += not text.strip()
        predictions.append(normalize_pope_answer(text))
        labels.append(annotation.data["label"])
    metrics = binary_metrics(predictions, labels)
    return PopeSplitResult(
        split=split,
        annotation_file=str(annotation_path),
        num_questions=min(len(questions), len(annotations)),
        num_answered=len(predictions),
        num_missing=missing,
        num_empty=empty,
        **metrics,
    )


def evaluate_pope(annotation_dir: PathLike, question_file: PathLike, result_file: PathLike) -> PopeResult:
    """Score a LLaVA-format answer file on POPE (see the module docstring for the protocol and checks)."""
    annotations = load_annotations(annotation_dir)
    questions = load_questions(question_file)
    result = PopeResult(splits={})
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
        result.splits[split] = _score_split(split, split_questions, path, split_annotations, answers)
    _report_missing(result, result_file)
    return result


def _report_missing(result: PopeResult, result_file: PathLike) -> None:
    """Warn about unanswered and empty answers (missing: not scored; empty: "yes", as in LLaVA)."""
    missing = [f"{s.split}: {s.num_missing} of {s.num_questions}" for s in result.splits.values() if s.num_missing]
    report_problems(result.warnings, f"{result_file}: questions without an answer (left out of the metrics)", missing)
    empty = [f"{s.split}: {s.num_empty}" for s in result.splits.values() if s.num_empty]
    report_problems(
        result.warnings, f"{result_file}: empty answers (scored as 'yes', as LLaVA's eval_pope.py does)", empty
    )
