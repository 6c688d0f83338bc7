"""Issue 20: the output rule of every command (never an input; an existing file or non-empty directory the
project did not write is refused unless ``--overwrite``), and an answering run that answered nothing fails."""

import json
import logging
import os

import pytest

from mllm_encoder.cli import eval_mllm, main


def _run_cli(capsys, *argv):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in argv])
    return exit_info.value.code, capsys.readouterr().err


def _questions(path, count=3, **extra):
    lines = [{"question_id": i, "text": f"Q{i}?", "image": f"{i}.jpg", **extra} for i in range(count)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_check_output_rules(tmp_path):
    from mllm_encoder.atomic import check_output

    mine = tmp_path / "mine.json"
    mine.write_text("{}")
    assert check_output(tmp_path / "new.json") is False and check_output(None) is False
    with pytest.raises(ValueError, match=r"mine\.json: exists; refusing to replace it \(.*pass --overwrite\)"):
        check_output(mine)
    assert check_output(mine, overwrite=True) is False
    with pytest.raises(ValueError, match="the output is the input"):
        check_output(mine, [mine], overwrite=True)
    with pytest.raises(ValueError, match="the output is the input"):
        check_output(tmp_path, [mine], overwrite=True, directory=True)  # a directory holding an input
    with pytest.raises(ValueError, match="is a directory"):
        check_output(tmp_path, overwrite=True)
    assert check_output(tmp_path, ours=lambda path: True, directory=True) is True
    (tmp_path / "empty").mkdir()
    assert check_output(tmp_path / "empty", directory=True) is False


def test_demo_refuses_a_directory_of_the_users_files(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("my report\n")
    (out / "results.json").write_text('{"mine": true}\n')
    code, err = _run_cli(capsys, "demo", "--quick", "--out", out)
    assert code == 1 and f"{out}: exists and is not a demo directory; refusing to replace it" in err
    assert sorted(os.listdir(out)) == ["report.md", "results.json"], "not even demo.log was written"
    assert (out / "report.md").read_text() == "my report\n"


@pytest.mark.parametrize("command", ["pope", "mme"])
def test_scoring_output_is_never_the_result_file_and_never_replaces_a_file(tmp_path, capsys, command):
    answers = tmp_path / "answers.jsonl"
    answers.write_text('{"question_id": 0, "prompt": "Q0?", "text": "yes"}\n')
    questions = _questions(tmp_path / "q.jsonl")
    data = ["--annotation-dir" if command == "pope" else "--mme-root", tmp_path]
    base = ["eval", command, *data, "--question-file", questions, "--result-file", answers]
    code, err = _run_cli(capsys, *base, "--output", answers, "--overwrite")
    assert code == 1 and f"{answers}: the output is the input {answers}" in err
    code, err = _run_cli(capsys, *base, "--output", questions)
    assert code == 1 and "the output is the input" in err
    other = tmp_path / "metrics.json"
    other.write_text("unrelated\n")
    code, err = _run_cli(capsys, *base, "--output", other)
    assert code == 1 and f"{other}: exists; refusing to replace it" in err and "--overwrite" in err
    assert answers.read_text().startswith('{"question_id": 0') and other.read_text() == "unrelated\n"


def test_merge_output_is_never_its_question_file_or_a_shard(tmp_path, capsys):
    questions = _questions(tmp_path / "q.jsonl", count=1)
    shard = tmp_path / "shard.jsonl"
    shard.write_text('{"question_id": 0, "prompt": "Q0?", "text": "yes"}\n')
    before = questions.read_text(), shard.read_text()
    for output in (questions, shard):
        code, err = _run_cli(capsys, "eval", "merge", "--question-file", questions, "--output", output, shard)
        assert code == 1 and f"{output}: the output is the input" in err
    assert (questions.read_text(), shard.read_text()) == before
    merged = tmp_path / "merged.jsonl"
    main(["eval", "merge", "--question-file", str(questions), "--output", str(merged), str(shard)])
    code, err = _run_cli(capsys, "eval", "merge", "--question-file", questions, "--output", merged, shard)
    assert code == 1 and "exists; refusing to replace it" in err
    main(["eval", "merge", "--question-file", str(questions), "--output", str(merged), str(shard), "--overwrite"])


def test_retrieval_output_never_replaces_an_unrelated_file(tmp_path, capsys):
    other = tmp_path / "notes.json"
    other.write_text("mine\n")
    code, err = _run_cli(capsys, "eval", "retrieval", "--model", tmp_path / "m", "--data", tmp_path, "--output", other)
    assert code == 1 and f"{other}: exists; refusing to replace it" in err and other.read_text() == "mine\n"


class _FakeLlava:
    model_name = "fake"

    def __init__(self, model_path, image_folder, **kwargs):
        self.image_folder = image_folder

    def __call__(self, question):
        from mllm_encoder.eval.mllm.answering import load_question_image

        load_question_image(self.image_folder, question["image"])
        return "yes"


def test_an_answering_run_that_answers_nothing_fails(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(eval_mllm, "answerer_class", lambda name="llava": _FakeLlava)
    questions = _questions(tmp_path / "q.jsonl")
    answers = tmp_path / "answers.jsonl"
    base = ["eval", "answer", "--model-path", tmp_path / "llava", "--question-file", questions]
    code, err = _run_cli(capsys, *base, "--image-folder", tmp_path / "missing", "--answers-file", answers)
    assert code == 1 and f"{tmp_path / 'missing'}: no such image folder (--image-folder)" in err
    images = tmp_path / "images"
    images.mkdir()  # exists, but holds none of the images
    code, err = _run_cli(capsys, *base, "--image-folder", images, "--answers-file", answers)
    assert code == 1 and "none of the 3 questions left was answered" in err and "0.jpg" in err

    code, err = _run_cli(capsys, *base, "--image-folder", images, "--answers-file", questions)
    assert code == 1 and "the output is the input" in err
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    code, err = _run_cli(capsys, *base, "--image-folder", images, "--answers-file", notes)
    assert code == 1 and f"{notes}: exists and is not an answer file" in err and notes.read_text() == "my notes\n"


def test_questions_with_null_text_are_refused_and_shared_ids_warned(tmp_path, capsys, monkeypatch, caplog):
    monkeypatch.setattr(eval_mllm, "answerer_class", lambda name="llava": _FakeLlava)
    questions = _questions(tmp_path / "q.jsonl", count=1, text=None)
    base = ["eval", "answer", "--model-path", tmp_path / "llava", "--image-folder", tmp_path]
    code, err = _run_cli(capsys, *base, "--question-file", questions, "--answers-file", tmp_path / "a.jsonl")
    assert code == 1 and f"{questions}:1: 'text' must be a string, got None" in err
    shared = tmp_path / "shared.jsonl"
    shared.write_text(
        "".join(json.dumps({"question_id": 7, "text": f"Q{i}?", "image": "0.jpg"}) + "\n" for i in range(2))
    )
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "0.jpg")
    with caplog.at_level(logging.WARNING):
        main([str(arg) for arg in base] + ["--question-file", str(shared), "--answers-file", str(tmp_path / "s.jsonl")])
    assert "1 questions share a question_id with an earlier one: line 2 (as line 1)" in caplog.text
