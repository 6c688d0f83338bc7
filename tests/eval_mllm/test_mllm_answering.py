"""The resumable answering loop (with a fake answer function), sharding, merging and the CLI wiring."""

import json
import logging
import math
import os
from collections import Counter
from pathlib import Path

import pytest

from mllm_encoder.cli import eval_mllm, main
from mllm_encoder.eval.mllm import answering
from mllm_encoder.eval.mllm.answering import answer_questions, get_chunk, merge_answer_files
from mllm_encoder.eval.mllm.jsonl import read_jsonl, repair_partial_tail


def make_questions(n: int, shared_ids: bool = False):
    """n questions; with ``shared_ids`` two questions per image share a question_id, as in MME."""
    return [
        {"question_id": f"img/{i // 2}.jpg" if shared_ids else i, "image": f"{i // 2}.jpg", "text": f"Q{i}?"}
        for i in range(n)
    ]


def write_questions(path: Path, questions) -> Path:
    path.write_text("".join(json.dumps(q) + "\n" for q in questions))
    return path


class FakeAnswerer:
    """Answers "Yes <text>", counting calls per question, and optionally dies on the ``fail_at``-th call."""

    def __init__(self, fail_at=None):
        self.calls = Counter()
        self.fail_at = fail_at

    def __call__(self, question):
        if self.fail_at is not None and sum(self.calls.values()) + 1 == self.fail_at:
            raise KeyboardInterrupt("injected interruption")
        self.calls[question["text"]] += 1
        return f"Yes {question['text']}"


def answers_in(path: Path):
    return [record.data for record in read_jsonl(path)]


def test_chunks_follow_llava_split_list():
    items = list(range(10))
    for num_chunks in (1, 2, 3, 4, 7, 10, 12):
        size = math.ceil(len(items) / num_chunks)
        llava_chunks = [items[i : i + size] for i in range(0, len(items), size)]
        ours = [get_chunk(items, num_chunks, k) for k in range(num_chunks)]
        assert ours[: len(llava_chunks)] == llava_chunks and not any(ours[len(llava_chunks) :])
    with pytest.raises(ValueError):
        get_chunk(items, 3, 3)


def test_resume_after_interruption_and_partial_line_loses_and_repeats_nothing(tmp_path, caplog):
    questions = make_questions(7, shared_ids=True)
    answers_file = tmp_path / "answers" / "model.jsonl"
    first = FakeAnswerer(fail_at=4)
    with pytest.raises(KeyboardInterrupt):
        answer_questions(questions, answers_file, first, "tiny-llava", progress=False)
    assert [a["prompt"] for a in answers_in(answers_file)] == ["Q0?", "Q1?", "Q2?"]
    with open(answers_file, "a") as handle:  # a kill in the middle of writing the next line
        handle.write('{"question_id": "img/1.jpg", "prompt": "Q3?", "te')
    second = FakeAnswerer()
    with caplog.at_level(logging.WARNING):
        stats = answer_questions(questions, answers_file, second, "tiny-llava", progress=False)
    assert "removed an incomplete last line" in caplog.text
    assert (stats.num_questions, stats.num_already_answered, stats.num_answered_now) == (7, 3, 4)
    assert set(second.calls) == {"Q3?", "Q4?", "Q5?", "Q6?"} and max(second.calls.values()) == 1
    answers = answers_in(answers_file)
    assert [a["prompt"] for a in answers] == [q["text"] for q in questions]
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions]
    assert all(a["text"] == f"Yes {a['prompt']}" and a["model_id"] == "tiny-llava" for a in answers)
    assert set(answers[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    assert len({a["answer_id"] for a in answers}) == 7
    third = FakeAnswerer()
    assert answer_questions(questions, answers_file, third, "tiny-llava", progress=False).num_answered_now == 0
    assert not third.calls


def test_complete_last_line_without_newline_is_kept(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(
        '{"question_id": 1, "prompt": "Q?", "text": "Yes"}\n{"question_id": 2, "prompt": "R?", "text": "No"}'
    )
    assert repair_partial_tail(path) == 0
    assert [r.data["question_id"] for r in read_jsonl(path)] == [1, 2] and path.read_text().endswith("\n")


def test_progress_bar_shows_rate_and_eta(tmp_path, capsys):
    answer_questions(make_questions(3), tmp_path / "a.jsonl", FakeAnswerer(), "m", progress=True)
    bar = capsys.readouterr().err
    assert "answering" in bar and "3/3" in bar and ("q/s" in bar or "s/q" in bar) and "<" in bar


def test_answers_of_another_run_are_warned_about(tmp_path, caplog):
    path = tmp_path / "a.jsonl"
    answer_questions(make_questions(2), path, FakeAnswerer(), "m", progress=False)
    with caplog.at_level(logging.WARNING):
        answer_questions([{"question_id": 9, "text": "other?"}], path, FakeAnswerer(), "m", progress=False)
    assert "2 answers are not to questions of this run (lines 1, 2" in caplog.text


def test_shards_merge_in_question_order(tmp_path, caplog):
    questions = make_questions(8, shared_ids=True)
    question_file = write_questions(tmp_path / "questions.jsonl", questions)
    shards = []
    for k in (2, 0, 1):  # shards finish in any order
        shard = tmp_path / f"3_{k}.jsonl"
        answer_questions(get_chunk(questions, 3, k), shard, FakeAnswerer(), "m", progress=False)
        shards.append(shard)
    merged = tmp_path / "merged.jsonl"
    assert merge_answer_files(question_file, shards, merged) == 0
    assert [a["prompt"] for a in answers_in(merged)] == [q["text"] for q in questions]
    with caplog.at_level(logging.WARNING):
        merge_answer_files(question_file, shards + [shards[0]], merged)
    assert f"{shards[0]}:1: duplicate answer" in caplog.text
    with pytest.raises(ValueError, match=r"2 questions of .* have no answer in the shards \(lines 7, 8\)"):
        merge_answer_files(question_file, shards[1:], merged)
    assert merge_answer_files(question_file, shards[1:], merged, allow_missing=True) == 2
    assert len(answers_in(merged)) == 6


def test_duplicate_questions_are_rejected(tmp_path):
    question_file = write_questions(tmp_path / "q.jsonl", make_questions(2) + make_questions(1))
    with pytest.raises(ValueError, match=rf"{question_file}:3: duplicate question \(first on line 1\)"):
        answering.load_question_file(question_file)


def test_cli_answer_resumes_a_shard_and_merge(tmp_path, monkeypatch, capsys):
    """The CLI wiring, with the LLaVA model replaced by a fake answerer."""

    class FakeLlava(FakeAnswerer):
        def __init__(self, model_path, image_folder, **kwargs):
            super().__init__()
            self.model_name = Path(model_path).name
            assert kwargs["conv_mode"] == "vicuna_v1" and kwargs["temperature"] == 0.0

    monkeypatch.setattr(eval_mllm, "answerer_class", lambda name="llava": FakeLlava)
    question_file = write_questions(tmp_path / "q.jsonl", make_questions(5))
    base = [
        "eval",
        "answer",
        "--model-path",
        str(tmp_path / "llava-tiny"),
        "--question-file",
        str(question_file),
    ]
    base += ["--image-folder", str(tmp_path), "--num-chunks", "2"]
    for k in (0, 1):
        main(base + ["--chunk-idx", str(k), "--answers-file", str(tmp_path / f"2_{k}.jsonl")])
    main(base + ["--chunk-idx", "0", "--answers-file", str(tmp_path / "2_0.jsonl")])
    assert "0 answered now, 3 before" in capsys.readouterr().out
    merged = tmp_path / "merged.jsonl"
    main(
        ["eval", "merge", "--question-file", str(question_file), "--output", str(merged)]
        + [
            str(tmp_path / "2_0.jsonl"),
            str(tmp_path / "2_1.jsonl"),
        ]
    )
    answers = answers_in(merged)
    assert [a["question_id"] for a in answers] == [0, 1, 2, 3, 4] and answers[0]["model_id"] == "llava-tiny"


def test_a_second_writer_of_an_answer_file_is_refused(tmp_path):
    from mllm_encoder.locking import LockError, file_lock

    answers_file = tmp_path / "answers.jsonl"
    with file_lock(answers_file, "answer file"):  # another `eval answer` on the same file
        with pytest.raises(LockError, match=rf"answer file {answers_file} is in use by pid {os.getpid()}"):
            answer_questions(make_questions(2), answers_file, FakeAnswerer(), "m", progress=False)
    assert not answers_file.exists()
    answer_questions(make_questions(2), answers_file, FakeAnswerer(), "m", progress=False)
    assert len(answers_in(answers_file)) == 2 and not Path(f"{answers_file}.lock").exists()


def test_unreadable_images_are_skipped_recorded_and_retried(tmp_path, caplog):
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(tmp_path / "0.jpg")
    good = (tmp_path / "0.jpg").read_bytes()
    (tmp_path / "1.jpg").write_bytes(good[: len(good) // 2])  # truncated
    questions = make_questions(6)  # images 0.jpg (Q0, Q1), 1.jpg (Q2, Q3), 2.jpg missing (Q4, Q5)

    def answer(question):
        image = answering.load_question_image(tmp_path, question["image"])
        return f"{image.size}"

    stats = answer_questions(questions, tmp_path / "a.jsonl", answer, "m", progress=False)
    assert (stats.num_answered_now, stats.num_skipped) == (2, 4)
    assert "1.jpg" in stats.skipped[0] and "2.jpg" in stats.skipped[2] and stats.skipped[0].startswith("2: ")
    assert [a["prompt"] for a in answers_in(tmp_path / "a.jsonl")] == ["Q0?", "Q1?"]
    assert "skipping question 2: cannot read image" in caplog.text
    (tmp_path / "1.jpg").write_bytes(good)
    again = answer_questions(questions, tmp_path / "a.jsonl", answer, "m", progress=False)
    assert (again.num_already_answered, again.num_answered_now, again.num_skipped) == (2, 2, 2)


@pytest.mark.parametrize("image", ["../../etc/passwd", "/etc/passwd", "a/../../x.jpg", 7])
def test_question_images_must_stay_in_the_image_folder(tmp_path, image):
    questions = [{"question_id": 0, "image": "ok/0.jpg", "text": "Q?"}, {"question_id": 1, "image": image, "text": "Q"}]
    question_file = write_questions(tmp_path / "q.jsonl", questions)
    with pytest.raises(ValueError, match=rf"{question_file}:2: .*image"):
        answering.load_question_file(question_file, tmp_path / "images")
    if image == "/etc/passwd":
        records = answering.load_question_file(question_file, tmp_path / "images", allow_absolute_paths=True)
        assert len(records) == 2
    with pytest.raises(ValueError, match="leaves the image root|absolute image path|non-empty string"):
        answering.load_question_image(tmp_path / "images", image)


def test_binary_answer_file_is_named(tmp_path):
    answers_file = tmp_path / "answers.jsonl"
    answers_file.write_bytes(b'{"question_id": 0, "prompt": "Q0?", "text": "yes"}\n\x89PNG\r\n\x1a\n\x00\xff\xfe')
    with pytest.raises(ValueError, match=rf"{answers_file}:2: not UTF-8 text \(a binary file\?\)"):
        read_jsonl(answers_file)


@pytest.mark.parametrize(
    "content", [b"\x89PNG\r\n\x1a\n\x00\xff", b"\xff\xd8\xff\xe0 no newline", b"plain text, no newline"]
)
def test_a_file_that_is_not_an_answer_file_is_never_cut(tmp_path, content):
    answers_file = tmp_path / "picture.png"
    answers_file.write_bytes(content)
    with pytest.raises(ValueError, match=rf"{answers_file}: (not UTF-8 text|the last line is neither JSON)"):
        answer_questions(make_questions(1), answers_file, FakeAnswerer(), "m", progress=False)
    assert answers_file.read_bytes() == content
