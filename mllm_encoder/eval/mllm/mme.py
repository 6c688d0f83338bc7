"""MME scoring with the official protocol (MME's ``eval_tool/calculation.py``, after LLaVA's conversion), or
with lmms-eval's or VLMEvalKit's answer parsing (:mod:`mllm_encoder.eval.mllm.protocols`).

LLaVA's ``llava_mme.jsonl`` asks two questions per image; ``question_id`` is the image path relative to the
MME release folder (``<category>/<name>`` or ``<category>/images/<name>``), so it is not unique. The ground
truth lies in the release: ``<category>/questions_answers_YN/<stem>.txt`` when ``<category>/images`` exists,
else ``<category>/<stem>.txt`` beside the images, with lines ``question<TAB>Yes|No`` where the question ends
in " Please answer yes or no." (LLaVA's conversion strips "Answer the question using a single word or phrase."
from the prompt and appends that sentence, falling back to a double space before it, which some files use).

Scoring: an answer is "yes"/"no" when its lower-cased text is exactly that, else when "yes" (checked first) or
"no" occurs in its first 4 characters, else "other", which is wrong (the other protocols differ only in this
parsing; all three compute the same scores from the parsed answers). Per subtask: acc = correct / questions,
acc+ = images with both questions right / images, score = 100 * acc + 100 * acc+. Perception (10 subtasks,
max 2000) and cognition (4 subtasks, max 800) are sums of subtask scores.

The official tool pairs consecutive lines; here the questions are grouped by image (the same pairs for LLaVA's
question file) and an image without exactly two questions is reported. A question without an answer is counted
as wrong (like "other") and reported, so an incomplete run can only score lower, never higher; so is an answer
whose text is not a string (a data problem: it is never parsed). A subtask without any answer scores 0, as in
lmms-eval's totals; MME's ``calculation.py`` and VLMEvalKit's ``MME_rating`` raise on it (``tool_failures``).
"""

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from mllm_encoder.eval.mllm.jsonl import JsonlRecord, PathLike, read_jsonl, require_fields
from mllm_encoder.eval.mllm.problems import (
    MME_LINE_BREAK_FAILURE,
    NON_STRING_FAILURES,
    AnswerChecks,
    copy_checks,
    malformed_text,
    report_problems,
    report_tool_failures,
)
from mllm_encoder.eval.mllm.protocols import (
    MME_PARSERS,
    ProtocolComparison,
    binary_metrics,
    check_protocol,
    compare_protocols,
)

PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
# the order in which VLMEvalKit's MME_rating sums the subtasks (it raises KeyError on the first one it lacks)
VLMEVALKIT_ORDER = tuple(sorted(PERCEPTION)) + tuple(sorted(COGNITION))
LLAVA_SUFFIX = "Answer the question using a single word or phrase."
MME_SUFFIX = "Please answer yes or no."

GroundTruth = Dict[Tuple[str, str], Dict[str, str]]  # (category, "<stem>.txt") -> {question: "yes"/"no"}


def _read_ground_truth_file(path: Path) -> Dict[str, str]:
    """``question<TAB>answer`` lines of one ground-truth file, answers lower-cased and checked."""
    answers = {}
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            parts = line.strip().split("\t")
            if len(parts) != 2 or parts[1].strip().lower() not in ("yes", "no"):
                raise ValueError(f"{path}:{line_number}: expected 'question<TAB>Yes|No', got {line.strip()!r}")
            answers[parts[0]] = parts[1].strip().lower()
    return answers


def load_mme_ground_truth(mme_root: PathLike) -> GroundTruth:
    """Read the ground truth of an MME release folder (both layouts, see the module docstring)."""
    mme_root = Path(mme_root)
    if not mme_root.is_dir():
        raise ValueError(f"{mme_root}: not a directory (expected the MME_Benchmark_release_version folder)")
    truth: GroundTruth = {}
    for category_dir in sorted(p for p in mme_root.iterdir() if p.is_dir()):
        has_images = (category_dir / "images").is_dir()
        qa_dir = category_dir / "questions_answers_YN" if has_images else category_dir
        if not qa_dir.is_dir():
            raise ValueError(f"{category_dir}: has images/ but no questions_answers_YN/ folder")
        for path in sorted(qa_dir.glob("*.txt")):
            truth[(category_dir.name, path.name)] = _read_ground_truth_file(path)
    if not truth:
        raise ValueError(f"{mme_root}: no ground-truth .txt files found (is it the MME release folder?)")
    return truth


def ground_truth_key(question_id: str) -> Tuple[str, str]:
    """(category, ground-truth file name) of an image path, as LLaVA's ``convert_answer_to_mme.py`` has it."""
    parts = question_id.split("/")
    return parts[0], parts[-1].split(".")[0] + ".txt"


def lookup_ground_truth(truth: GroundTruth, question_id: str, prompt: str) -> str:
    """The "yes"/"no" ground truth of one question, matching LLaVA's prompt-to-MME-question conversion.

    Raises:
        KeyError: when the image's file or the question is not in the ground truth.
    """
    file_truth = truth[ground_truth_key(question_id)]
    question = prompt.replace(LLAVA_SUFFIX, "").strip() if LLAVA_SUFFIX in prompt else prompt
    if MME_SUFFIX in question:
        return file_truth[question]
    single = f"{question} {MME_SUFFIX}"
    return file_truth[single] if single in file_truth else file_truth[f"{question}  {MME_SUFFIX}"]


@dataclass
class MMESubtaskResult:
    """Counts and metrics of one MME subtask (acc, acc_plus: fractions; score = 100*acc + 100*acc_plus)."""

    subtask: str
    num_questions: int
    num_images: int
    num_answered: int
    num_missing: int
    num_other: int
    num_correct: int
    num_images_both_correct: int
    acc: float
    acc_plus: float
    score: float
    tp: int
    fp: int
    tn: int
    fn: int
    precision: float
    recall: float


@dataclass
class MMEChecks(AnswerChecks):
    """Every data problem found joining an answer file to MME's questions (see the module docstring)."""

    num_malformed: int = 0
    # MME subtasks not one of whose questions has an answer (absent from the answer file): each scores 0
    subtasks_without_answers: List[str] = field(default_factory=list)


@dataclass
class MMEResult(MMEChecks):
    """Per-subtask results, perception/cognition totals and every data problem found."""

    subtasks: Dict[str, MMESubtaskResult] = field(default_factory=dict)
    protocol: str = "llava"
    # answers ("file:line: why") and absent subtasks ("file: why") on which the protocol's own tool raises: it
    # would not have scored the file
    tool_failures: List[str] = field(default_factory=list)

    def _total(self, names: Tuple[str, ...]) -> float:
        return sum(self.subtasks[name].score for name in names if name in self.subtasks)

    @property
    def perception(self) -> float:
        """Sum of the perception subtask scores (max 2000): the MME number LLaVA-1.5 reports."""
        return self._total(PERCEPTION)

    @property
    def cognition(self) -> float:
        """Sum of the cognition subtask scores (max 800)."""
        return self._total(COGNITION)

    @property
    def num_missing(self) -> int:
        """Questions without an answer, or whose answer is not a string (scored as wrong)."""
        return sum(s.num_missing for s in self.subtasks.values())

    def to_dict(self) -> Dict[str, Any]:
        """Every number, JSON-serialisable."""
        out = asdict(self)
        out.update(perception=self.perception, cognition=self.cognition)
        out.update(total=self.perception + self.cognition, num_missing=self.num_missing)
        out["missing_subtasks"] = [name for name in PERCEPTION + COGNITION if name not in self.subtasks]
        return out


def _load_questions(question_file: PathLike, truth: GroundTruth) -> List[Tuple[JsonlRecord, str]]:
    """Questions with their ground truth; (question_id, text) must be unique and known to the ground truth."""
    questions, seen = [], {}
    for record in read_jsonl(question_file):
        require_fields(question_file, record, ("question_id", "text"))
        if not isinstance(record.data["question_id"], str) or "/" not in record.data["question_id"]:
            raise ValueError(f"{question_file}:{record.line}: MME question_id must be an image path 'subtask/...'")
        if not isinstance(record.data["text"], str):
            raise ValueError(f"{question_file}:{record.line}: text must be a string")
        key = (record.data["question_id"], record.data["text"])
        if key in seen:
            raise ValueError(f"{question_file}:{record.line}: duplicate question (first on line {seen[key]})")
        seen[key] = record.line
        try:
            answer = lookup_ground_truth(truth, *key)
        except KeyError:
            raise ValueError(
                f"{question_file}:{record.line}: no MME ground truth for image {key[0]!r} and this question "
                f"(looked in {'/'.join(ground_truth_key(key[0]))}); is --mme-root the MME release folder?"
            ) from None
        questions.append((record, answer))
    return questions


def _index_answers(result_file: PathLike, known: set, result: "MMEAnswers") -> Dict[Tuple[str, str], JsonlRecord]:
    """Answers by (question_id, prompt), first kept; unknown and duplicate answers counted and warned."""
    answers: Dict[Tuple[str, str], JsonlRecord] = {}
    unknown, duplicate = [], []
    records = read_jsonl(result_file)
    for record in records:
        require_fields(result_file, record, ("question_id", "prompt", "text"))
        key = (record.data["question_id"], record.data["prompt"])
        if not all(isinstance(part, str) for part in key) or key not in known:
            unknown.append(f"{result_file}:{record.line} ({key[0]!r})")
        elif key in answers:
            duplicate.append(f"{result_file}:{record.line} (kept line {answers[key].line})")
        else:
            answers[key] = record
    if records and not answers:
        raise ValueError(f"{result_file}: none of its {len(records)} answers matches a question; wrong files?")
    result.num_answers, result.num_unknown, result.num_duplicate = len(records), len(unknown), len(duplicate)
    report_problems(
        result.warnings, f"{len(unknown)} answers to questions not in the question file (not scored)", unknown
    )
    report_problems(result.warnings, f"{len(duplicate)} duplicate answers (the first is scored)", duplicate)
    return answers


@dataclass
class MMEAnswer:
    """One question: its image, ground truth, and answer text (None: no answer or a non-string one;
    ``non_string``: ``str()`` of a non-string answer, which only VLMEvalKit's protocol reads)."""

    image: str
    truth: str
    text: Optional[str]
    location: Optional[str]
    non_string: Optional[str] = None


@dataclass
class MMEAnswers(MMEChecks):
    """An answer file joined to MME's questions and ground truth, checked, before any protocol parses it."""

    subtasks: Dict[str, List[MMEAnswer]] = field(default_factory=dict)
    tool_failures: Dict[str, List[str]] = field(default_factory=dict)  # per protocol, see MMEResult

    @property
    def items(self) -> List[Tuple[str, str, str]]:
        """(location, text, ground truth) of every answered question."""
        return [(a.location, a.text, a.truth) for items in self.subtasks.values() for a in items if a.text is not None]


def _score_subtask(name: str, items: List[Tuple[str, str, str]]) -> MMESubtaskResult:
    """Score one subtask from (image, ground truth, parsed prediction or "missing") triples."""
    images: Dict[str, List[bool]] = {}
    for image, truth, prediction in items:
        images.setdefault(image, []).append(prediction == truth)
    answered = [(prediction, truth) for _, truth, prediction in items if prediction in ("yes", "no")]
    metrics = binary_metrics([p for p, _ in answered], [t for _, t in answered])
    num_correct = sum(sum(flags) for flags in images.values())
    both = sum(all(flags) for flags in images.values())
    acc, acc_plus = num_correct / len(items), both / len(images)
    return MMESubtaskResult(
        subtask=name,
        num_questions=len(items),
        num_images=len(images),
        num_answered=sum(prediction != "missing" for _, _, prediction in items),
        num_missing=sum(prediction == "missing" for _, _, prediction in items),
        num_other=sum(prediction == "other" for _, _, prediction in items),
        num_correct=num_correct,
        num_images_both_correct=both,
        acc=acc,
        acc_plus=acc_plus,
        score=100 * acc + 100 * acc_plus,
        **{k: metrics[k] for k in ("tp", "fp", "tn", "fn", "precision", "recall")},
    )


def load_mme_answers(mme_root: PathLike, question_file: PathLike, result_file: PathLike) -> MMEAnswers:
    """Join a LLaVA-format answer file to MME's questions and ground truth, reporting every data problem."""
    truth = load_mme_ground_truth(mme_root)
    questions = _load_questions(question_file, truth)
    result = MMEAnswers()
    known = {(q.data["question_id"], q.data["text"]) for q, _ in questions}
    answers = _index_answers(result_file, known, result)
    malformed, line_breaks = [], []
    for question, gt in questions:
        answer = answers.get((question.data["question_id"], question.data["text"]))
        problem = None if answer is None else malformed_text(result_file, answer)
        if problem is not None:
            malformed.append(problem)
        usable = answer is not None and problem is None
        if usable and any(mark in answer.data["text"] for mark in "\n\r\t"):
            line_breaks.append(f"{result_file}:{answer.line} (text {answer.data['text']!r}): {MME_LINE_BREAK_FAILURE}")
        image = question.data["question_id"]
        result.subtasks.setdefault(ground_truth_key(image)[0], []).append(
            MMEAnswer(
                image=image,
                truth=gt,
                text=answer.data["text"] if usable else None,
                location=f"{result_file}:{answer.line}" if answer is not None else None,
                non_string=str(answer.data["text"]) if problem is not None else None,
            )
        )
    result.num_malformed = len(malformed)
    report_problems(
        result.warnings,
        f"{len(malformed)} answers whose text is not a string (a data problem; scored as wrong without being parsed, "
        "except by VLMEvalKit's protocol, which reads str() of them)",
        malformed,
    )
    failures = {protocol: [f"{p}: {why}" for p in malformed] for protocol, why in NON_STRING_FAILURES["mme"].items()}
    failures["llava"] += line_breaks
    _check_structure(result, result_file)
    for protocol, failure in _absent_subtask_failures(result_file, result.subtasks_without_answers).items():
        failures.setdefault(protocol, []).append(failure)
    result.tool_failures = failures
    return result


def _absent_subtask_failures(result_file: PathLike, absent: List[str]) -> Dict[str, str]:
    """What each protocol's own tool does when the MME subtasks ``absent`` have no answer at all, where it raises.

    LLaVA's ``convert_answer_to_mme.py`` writes one file per subtask it has answers for, and MME's
    ``calculation.py`` opens every subtask's file in order (perception first, its totals printed before cognition's
    files are opened); VLMEvalKit's ``MME_rating`` looks up every subtask's score in ``VLMEVALKIT_ORDER``.
    lmms-eval's ``mme_aggregate_results`` sums the subtasks it has results for: the same totals as here, where an
    absent subtask scores 0, so it has no entry.
    """
    if not absent:
        return {}
    first = absent[0]
    printed = ", after printing the perception scores" if first in COGNITION else ""
    subtasks, them = ("subtask", "it") if len(absent) == 1 else ("subtasks", "them")
    where = f"{result_file}: no answers to MME {subtasks} {', '.join(absent)}"
    return {
        "llava": f"{where}: LLaVA's convert_answer_to_mme.py writes no file for {them} and MME's calculation.py "
        f"raises FileNotFoundError ({first}.txt){printed}",
        "vlmevalkit": f"{where}: VLMEvalKit's MME_rating raises KeyError "
        f"({next(name for name in VLMEVALKIT_ORDER if name in absent)!r})",
    }


def score_mme(answers: MMEAnswers, protocol: str = "llava") -> MMEResult:
    """Score joined answers, parsing them as ``protocol`` does (``llava``, ``lmms-eval`` or ``vlmevalkit``)."""
    parse = MME_PARSERS[check_protocol(protocol)]

    def prediction(answer: MMEAnswer) -> str:
        if answer.text is not None:
            return parse(answer.text)
        if answer.non_string is not None:  # VLMEvalKit reads str() of it; the others score it as wrong
            return parse(answer.non_string) if protocol == "vlmevalkit" else "missing"
        return "missing"

    items = {name: [(a.image, a.truth, prediction(a)) for a in subtask] for name, subtask in answers.subtasks.items()}
    order = [name for name in PERCEPTION + COGNITION if name in items] + sorted(
        set(items) - set(PERCEPTION + COGNITION)
    )
    subtasks = {name: _score_subtask(name, items[name]) for name in order}
    result = MMEResult(subtasks=subtasks, protocol=protocol, **copy_checks(answers, MMEChecks))
    result.tool_failures = list(answers.tool_failures.get(protocol, []))
    report_tool_failures(result.warnings, protocol, result.tool_failures)
    return result


def evaluate_mme(
    mme_root: PathLike, question_file: PathLike, result_file: PathLike, protocol: str = "llava"
) -> MMEResult:
    """Score a LLaVA-format answer file on MME under ``protocol`` (see the module docstring)."""
    check_protocol(protocol)
    return score_mme(load_mme_answers(mme_root, question_file, result_file), protocol)


def compare_mme_protocols(
    mme_root: PathLike, question_file: PathLike, result_file: PathLike
) -> ProtocolComparison[MMEResult]:
    """Score one answer file with every protocol's parser (read and checked once) and list where they disagree."""
    return compare_protocols(load_mme_answers(mme_root, question_file, result_file), score_mme, MME_PARSERS)


def _check_structure(result: MMEAnswers, result_file: PathLike) -> None:
    """Warn about images without exactly two questions, unknown or absent subtasks and missing answers, and list
    the MME subtasks without any answer."""
    counts: Dict[str, int] = {}
    for answers in result.subtasks.values():
        for answer in answers:
            counts[answer.image] = counts.get(answer.image, 0) + 1
    odd = [f"{image} ({n} questions)" for image, n in counts.items() if n != 2]
    report_problems(result.warnings, "images without exactly two questions (MME pairs two per image)", odd)
    extra = sorted(set(result.subtasks) - set(PERCEPTION + COGNITION))
    report_problems(result.warnings, "categories that are not MME subtasks (scored, left out of the totals)", extra)
    absent = [name for name in PERCEPTION + COGNITION if name not in result.subtasks]
    report_problems(
        result.warnings, "MME subtasks absent from the question file (totals are incomplete)", absent, limit=14
    )
    missing = [
        f"{name}: {n}" for name, answers in result.subtasks.items() if (n := sum(a.location is None for a in answers))
    ]
    report_problems(result.warnings, f"{result_file}: questions without an answer (scored as wrong)", missing, limit=14)
    result.subtasks_without_answers = [
        name
        for name in PERCEPTION + COGNITION
        if all(answer.location is None for answer in result.subtasks.get(name, []))
    ]
    report_problems(
        result.warnings,
        f"{result_file}: MME subtasks without any answer (each adds 0 to the totals, as in lmms-eval; the LLaVA "
        "and VLMEvalKit protocols' own tools raise instead)",
        result.subtasks_without_answers,
        limit=14,
    )
