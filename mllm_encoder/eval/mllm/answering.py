"""The resumable answering loop and shard merging, in LLaVA's answer-file format (model-agnostic).

An answer file is appended one flushed line per question by one process at a time (a second writer is refused:
``ANSWERS.lock``, see :mod:`mllm_encoder.locking`). On restart a partial last line (from a kill) is repaired,
questions already answered are skipped, so nothing is lost and nothing is answered twice. A question whose image
cannot be read is skipped, counted and named (like a bad training sample), and tried again on the next run. Questions
are identified by (``question_id``, ``text``) because ``question_id`` is not unique in every benchmark (MME
asks two questions per image under the image's path). Sharding follows LLaVA's ``--num-chunks/--chunk-idx``.
With ``batch_size > 1`` the answer function's ``answer_questions`` answers the pending questions in batches (in
question order); each answer is still written and flushed as soon as its batch is done.
"""

import json
import logging
import math
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar, Union

from PIL import Image
from tqdm import tqdm

from mllm_encoder.data.dataset import load_image
from mllm_encoder.data.records import resolve_image_path
from mllm_encoder.eval.mllm.jsonl import (
    JsonlRecord,
    PathLike,
    dumps_line,
    read_jsonl,
    repair_partial_tail,
    require_fields,
    write_jsonl_atomic,
)
from mllm_encoder.locking import file_lock

logger = logging.getLogger(__name__)

AnswerFn = Callable[[Dict[str, Any]], str]
QuestionKey = Tuple[str, str]
T = TypeVar("T")


class BadImageError(ValueError):
    """A question's image cannot be read; :func:`answer_questions` skips and records the question."""


def question_image_path(image_folder: PathLike, image: Any, where: str, allow_absolute_paths: bool = False) -> str:
    """The path of a question's image inside ``image_folder``; a ``ValueError`` naming ``where`` when the path
    is not a string, leaves the folder, or is absolute without ``allow_absolute_paths``."""
    if not isinstance(image, str) or not image:
        raise ValueError(f"{where}: 'image' must be a non-empty string path, got {image!r}")
    return resolve_image_path(image, image_folder, where, allow_absolute_paths)


def load_question_image(image_folder: PathLike, image: str, allow_absolute_paths: bool = False) -> Image.Image:
    """A question's image, fully decoded, in RGB; ``BadImageError`` names the file when it cannot be read."""
    path = question_image_path(image_folder, image, "question image", allow_absolute_paths)
    try:
        return load_image(path).convert("RGB")
    except Exception as error:  # a missing, truncated or non-image file: skip this question, not the run
        raise BadImageError(f"cannot read image {path}: {error}") from error


def question_key(question_id: Any, text: str) -> QuestionKey:
    """The identity of a question (or of the answer to it: its ``question_id`` and ``prompt``)."""
    return json.dumps(question_id), text


def load_question_file(
    question_file: PathLike, image_folder: Optional[PathLike] = None, allow_absolute_paths: bool = False
) -> List[JsonlRecord]:
    """Read a LLaVA question file (``question_id`` and ``text`` required; no question twice).

    With ``image_folder``, every ``image`` is checked to lie inside it (see :func:`question_image_path`).
    """
    questions = read_jsonl(question_file)
    seen: Dict[QuestionKey, int] = {}
    for record in questions:
        require_fields(question_file, record, ("question_id", "text"))
        if not isinstance(record.data["text"], str):
            raise ValueError(f"{question_file}:{record.line}: 'text' must be a string, got {record.data['text']!r}")
        if image_folder is not None:
            require_fields(question_file, record, ("image",))
            where = f"{question_file}:{record.line}"
            question_image_path(image_folder, record.data["image"], where, allow_absolute_paths)
        key = question_key(record.data["question_id"], record.data["text"])
        if key in seen:
            raise ValueError(f"{question_file}:{record.line}: duplicate question (first on line {seen[key]})")
        seen[key] = record.line
    return questions


def get_chunk(items: Sequence[T], num_chunks: int, chunk_idx: int) -> List[T]:
    """Chunk ``chunk_idx`` of ``num_chunks`` contiguous chunks of size ceil(n / num_chunks), as LLaVA splits.

    Chunks past the end (more chunks than items allow) are empty.
    """
    if num_chunks < 1 or not 0 <= chunk_idx < num_chunks:
        raise ValueError(f"need num_chunks >= 1 and 0 <= chunk_idx < num_chunks, got {num_chunks}, {chunk_idx}")
    size = max(1, math.ceil(len(items) / num_chunks))
    return list(items[chunk_idx * size : (chunk_idx + 1) * size])


def make_answer(question: Dict[str, Any], text: str, model_id: str) -> Dict[str, Any]:
    """One answer record in LLaVA's format (``model_vqa_loader.py``)."""
    return {
        "question_id": question["question_id"],
        "prompt": question["text"],
        "text": text,
        "answer_id": uuid.uuid4().hex,
        "model_id": model_id,
        "metadata": {},
    }


def answered_keys(answers_file: PathLike) -> Dict[QuestionKey, int]:
    """Repair a killed answer file's tail, then map each answered question to its line."""
    if not Path(answers_file).exists():
        return {}
    repair_partial_tail(answers_file)
    done: Dict[QuestionKey, int] = {}
    for record in read_jsonl(answers_file):
        require_fields(answers_file, record, ("question_id", "prompt", "text"))
        done.setdefault(question_key(record.data["question_id"], record.data["prompt"]), record.line)
    return done


@dataclass
class AnswerStats:
    """What one run of :func:`answer_questions` did."""

    num_questions: int
    num_already_answered: int
    num_answered_now: int
    skipped: List[str] = field(default_factory=list)  # "question_id: reason" of questions with a bad image

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)


def answer_questions(
    questions: Sequence[Dict[str, Any]],
    answers_file: PathLike,
    answer_fn: AnswerFn,
    model_id: str,
    progress: bool = True,
    batch_size: int = 1,
) -> AnswerStats:
    """Answer every question not yet in ``answers_file``, appending one flushed and synced line per answer.

    Holds the answer file's lock throughout (``LockError`` when another process writes it). A question whose
    image cannot be read (``answer_fn`` raises :class:`BadImageError`) is skipped and listed in ``skipped``.
    With ``batch_size > 1``, ``answer_fn.answer_questions(batch)`` answers ``batch_size`` questions at a time,
    returning an answer or a :class:`BadImageError` per question.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if batch_size > 1 and not callable(getattr(answer_fn, "answer_questions", None)):
        raise ValueError(f"{type(answer_fn).__name__} answers one question at a time: use batch_size 1")
    with file_lock(answers_file, "answer file"):
        return _answer_unlocked(questions, answers_file, answer_fn, model_id, progress, batch_size)


def _answer_batch(
    answer_fn: AnswerFn, batch: Sequence[Dict[str, Any]], batch_size: int
) -> List[Union[str, BadImageError]]:
    """The answers to ``batch`` (one call of ``answer_fn.answer_questions``, or one call per question)."""
    if batch_size > 1:
        results = answer_fn.answer_questions(batch)  # type: ignore[attr-defined]
        assert len(results) == len(batch), "one answer per question"
        return results
    try:
        return [answer_fn(batch[0])]
    except BadImageError as error:
        return [error]


def _answer_unlocked(
    questions: Sequence[Dict[str, Any]],
    answers_file: PathLike,
    answer_fn: AnswerFn,
    model_id: str,
    progress: bool,
    batch_size: int,
) -> AnswerStats:
    done = answered_keys(answers_file)
    keys = [question_key(q["question_id"], q["text"]) for q in questions]
    strangers = sorted(set(done) - set(keys), key=done.get)
    if strangers:
        lines = ", ".join(str(done[key]) for key in strangers[:5])
        logger.warning(
            "%s: %d answers are not to questions of this run (lines %s%s): another question file or chunk?",
            answers_file,
            len(strangers),
            lines,
            ", ..." if len(strangers) > 5 else "",
        )
    pending = [q for q, key in zip(questions, keys) if key not in done]
    num_done = len(questions) - len(pending)
    if num_done:
        logger.info("%s: resuming, %d of %d questions already answered", answers_file, num_done, len(questions))
    skipped: List[str] = []
    with (
        open(answers_file, "a", encoding="utf-8") as handle,
        tqdm(total=len(questions), initial=num_done, unit="q", desc="answering", disable=not progress) as bar,
    ):
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            for question, text in zip(batch, _answer_batch(answer_fn, batch, batch_size)):
                if isinstance(text, BadImageError):
                    logger.warning("skipping question %s: %s", json.dumps(question["question_id"]), text)
                    skipped.append(f"{json.dumps(question['question_id'])}: {text}")
                    continue
                handle.write(dumps_line(make_answer(question, text, model_id)))
            handle.flush()
            os.fsync(handle.fileno())
            bar.update(len(batch))
    if skipped:
        logger.warning(
            "%s: %d questions skipped because their image cannot be read (rerun to retry them)",
            answers_file,
            len(skipped),
        )
    return AnswerStats(len(questions), num_done, len(pending) - len(skipped), skipped)


def merge_answer_files(
    question_file: PathLike,
    shard_files: Sequence[PathLike],
    output_file: PathLike,
    allow_missing: bool = False,
) -> int:
    """Merge sharded answer files into one, in question-file order (what LLaVA's position-based scorers need).

    Duplicates keep their first occurrence; answers to unknown questions are dropped; both are warned about.

    Returns:
        The number of questions without an answer (0 unless ``allow_missing``).

    Raises:
        ValueError: when a question has no answer and ``allow_missing`` is False, or a shard is malformed.
    """
    questions = load_question_file(question_file)
    known = {question_key(q.data["question_id"], q.data["text"]) for q in questions}
    answers: Dict[QuestionKey, Dict[str, Any]] = {}
    problems: List[str] = []
    for shard in shard_files:
        for record in read_jsonl(shard):
            require_fields(shard, record, ("question_id", "prompt", "text"))
            key = question_key(record.data["question_id"], record.data["prompt"])
            if key not in known:
                problems.append(f"{shard}:{record.line}: answer to a question not in {question_file} (dropped)")
            elif key in answers:
                problems.append(f"{shard}:{record.line}: duplicate answer (first kept)")
            else:
                answers[key] = record.data
    for problem in problems:
        logger.warning(problem)
    ordered = [answers.get(question_key(q.data["question_id"], q.data["text"])) for q in questions]
    missing = [q for q, answer in zip(questions, ordered) if answer is None]
    if missing:
        lines = ", ".join(str(q.line) for q in missing[:5]) + (", ..." if len(missing) > 5 else "")
        message = f"{len(missing)} questions of {question_file} have no answer in the shards (lines {lines})"
        if not allow_missing:
            raise ValueError(message + "; finish the shards or pass allow_missing")
        logger.warning(message)
    write_jsonl_atomic(output_file, [answer for answer in ordered if answer is not None])
    return len(missing)
