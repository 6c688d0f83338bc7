"""Batched answering (``clip-moe eval answer --batch-size``): a tiny LLaVA-1.5 with a CLIP-MoE tower answers a
left-padded batch of questions of different lengths about images of different sizes exactly as it answers them
one at a time (greedy, fp32)."""

import json

import pytest

from mllm_encoder.cli import main
from mllm_encoder.eval.mllm.answering import answer_questions
from mllm_encoder.eval.mllm.jsonl import read_jsonl

QUESTIONS = (
    "Is there a cat in the image?",
    "What color is it?",
    "Describe the picture briefly, and say whether there is a dog, a car or a person in the image.",
    "Is it red?",
    "Is there a yellow shape in the image? Please answer yes or no.",
)


@pytest.fixture(scope="module")
def tiny_llava_questions(tmp_path_factory):
    """A tiny LLaVA-1.5 checkpoint, five questions about images of five sizes, and one unreadable image."""
    try:
        from llava_fixtures import build_tiny_llava, synthetic_image
    except ImportError as error:
        pytest.skip(f"the LLaVA stack does not import in this environment: {error}")
    root = tmp_path_factory.mktemp("batched")
    model_dir = build_tiny_llava(root / "llava-tiny-clip-moe")
    (root / "images").mkdir()
    questions = []
    for i, (text, color) in enumerate(zip(QUESTIONS, ("red", "green", "blue", "yellow", "red"))):
        synthetic_image(color, 16 + 12 * i, i).save(root / "images" / f"{i}.png")
        questions.append({"question_id": i, "image": f"{i}.png", "text": text})
    (root / "images" / "broken.png").write_text("not an image")
    questions.insert(2, {"question_id": 99, "image": "broken.png", "text": "Is this readable?"})
    (root / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    return root, model_dir, questions


def test_a_batch_answers_as_one_at_a_time(tiny_llava_questions):
    from PIL import Image

    from llava_patch.integrations.answerer import LlavaAnswerer

    root, model_dir, questions = tiny_llava_questions
    answerer = LlavaAnswerer(str(model_dir), str(root / "images"), device="cpu", max_new_tokens=8)
    good = [q for q in questions if q["image"] != "broken.png"]
    one_at_a_time = [answerer(q) for q in good]
    assert len(set(one_at_a_time)) > 1 and all(one_at_a_time), one_at_a_time  # distinct, non-empty answers
    images = [Image.open(root / "images" / q["image"]).convert("RGB") for q in good]
    assert answerer.answer_batch([q["text"] for q in good], images) == one_at_a_time
    results = answerer.answer_questions(questions)
    assert [r for r in results if isinstance(r, str)] == one_at_a_time
    assert "cannot read image" in str(results[2])


def test_cli_batch_size_writes_the_batch_one_answers(tiny_llava_questions, tmp_path, capsys):
    root, model_dir, questions = tiny_llava_questions
    argv = ["eval", "answer", "--model-path", str(model_dir), "--image-folder", str(root / "images")]
    argv += ["--question-file", str(root / "questions.jsonl"), "--device", "cpu", "--max_new_tokens", "8"]
    main(argv + ["--answers-file", str(tmp_path / "one.jsonl")])
    main(argv + ["--answers-file", str(tmp_path / "batched.jsonl"), "--batch-size", "4"])
    one = [(r.data["question_id"], r.data["text"]) for r in read_jsonl(tmp_path / "one.jsonl")]
    batched = [(r.data["question_id"], r.data["text"]) for r in read_jsonl(tmp_path / "batched.jsonl")]
    assert batched == one and [qid for qid, _ in one] == [0, 1, 2, 3, 4]  # the broken image is skipped
    with pytest.raises(SystemExit):
        main(argv + ["--answers-file", str(tmp_path / "none.jsonl"), "--batch-size", "0"])
    assert "--batch-size must be at least 1, got 0" in capsys.readouterr().err


def test_an_answer_function_without_batches_is_refused(tmp_path):
    with pytest.raises(ValueError, match="function answers one question at a time: use batch_size 1"):
        answer_questions([], tmp_path / "a.jsonl", lambda q: "yes", "m", batch_size=2)
