"""The real answering step on CPU: tiny LLaVA with a CLIP-MoE tower, interrupted, resumed, scored."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mllm_encoder.cli import main
from mllm_encoder.eval.mllm.answering import answer_questions
from mllm_encoder.eval.mllm.jsonl import read_jsonl

SUFFIX = "\nAnswer the question using a single word or phrase."
OBJECTS = ("cat", "dog", "car")


@pytest.fixture(scope="module")
def tiny_pope(tmp_path_factory):
    """A tiny LLaVA checkpoint with a CLIP-MoE tower, three images and a 3-question POPE set."""
    try:
        from llava_fixtures import build_tiny_llava, synthetic_image
    except ImportError as error:
        pytest.skip(f"the LLaVA stack does not import in this environment: {error}")
    root = tmp_path_factory.mktemp("tiny_pope")
    model_dir = build_tiny_llava(root / "llava-tiny-clip-moe")
    (root / "val2014").mkdir()
    questions, annotations = [], []
    for i, (color, obj) in enumerate(zip(("red", "green", "blue"), OBJECTS), start=1):
        synthetic_image(color, 32, i).save(root / "val2014" / f"{i}.png")
        text = f"Is there a {obj} in the image?"
        questions.append({"question_id": i, "image": f"{i}.png", "text": text + SUFFIX, "category": "random"})
        annotations.append({"question_id": i, "image": f"{i}.png", "text": text, "label": "yes" if i % 2 else "no"})
    (root / "coco").mkdir()
    (root / "coco" / "coco_pope_random.json").write_text("".join(json.dumps(a) + "\n" for a in annotations))
    (root / "llava_pope_test.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    return root, model_dir, questions


def test_llava_answering_resumes_and_scores(tiny_pope, tmp_path):
    from llava_patch.integrations.answerer import LlavaAnswerer

    root, model_dir, questions = tiny_pope
    answerer = LlavaAnswerer(str(model_dir), str(root / "val2014"), device="cpu", max_new_tokens=6)
    assert "MoE" in type(answerer.model.get_vision_tower()).__name__
    prompt = answerer.build_prompt(questions[0]["text"])
    assert prompt.endswith(f"USER: <image>\n{questions[0]['text']} ASSISTANT:")  # vicuna_v1, as LLaVA-1.5
    reference = [answerer(q) for q in questions]
    assert all(isinstance(text, str) and not text.startswith("A chat") for text in reference)  # new tokens

    calls = []

    def interrupted(question):
        if len(calls) == 2:
            raise KeyboardInterrupt("injected")
        calls.append(question["question_id"])
        return answerer(question)

    answers_file = tmp_path / "answers" / "llava-tiny.jsonl"
    with pytest.raises(KeyboardInterrupt):
        answer_questions(questions, answers_file, interrupted, answerer.model_name, progress=False)
    with open(answers_file, "a") as handle:
        handle.write('{"question_id": 3, "prompt": "Is the')  # killed mid-line
    argv = ["eval", "answer", "--model-path", str(model_dir), "--image-folder", str(root / "val2014")]
    argv += ["--question-file", str(root / "llava_pope_test.jsonl"), "--answers-file", str(answers_file)]
    main(argv + ["--device", "cpu", "--max_new_tokens", "6"])

    answers = [record.data for record in read_jsonl(answers_file)]
    assert [a["question_id"] for a in answers] == [1, 2, 3]  # nothing lost, nothing twice
    assert [a["text"] for a in answers] == reference  # greedy decoding: the resumed run answers identically
    assert answers[0]["model_id"] == "llava-tiny-clip-moe" and answers[0]["prompt"] == questions[0]["text"]
    output = tmp_path / "pope.json"
    main(
        [
            "eval",
            "pope",
            "--annotation-dir",
            str(root / "coco"),
            "--question-file",
            str(root / "llava_pope_test.jsonl"),
        ]
        + ["--result-file", str(answers_file), "--output", str(output)]
    )
    report = json.loads(output.read_text())
    assert report["splits"]["random"]["num_answered"] == 3 and report["num_missing"] == 0


SCRIPTS = Path(__file__).resolve().parents[2] / "scripts" / "eval"


@pytest.mark.parametrize("script", ["pope.sh", "mme.sh"])
def test_scripts_are_valid_bash(script):
    assert subprocess.run(["bash", "-n", str(SCRIPTS / script)]).returncode == 0


@pytest.mark.slow
@pytest.mark.multiprocess
def test_pope_script_answers_in_two_shards_merges_and_scores(tiny_pope, tmp_path):
    root, model_dir, _ = tiny_pope
    data = tmp_path / "pope"
    shutil.copytree(root, data, ignore=shutil.ignore_patterns("answers"))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="0,1", ANSWER_ARGS="--device cpu --max_new_tokens 4")
    env["CLIP_MOE"] = str(Path(sys.executable).parent / "clip-moe")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SCRIPTS.parents[1]), env.get("PYTHONPATH")]))
    run = subprocess.run(
        ["bash", str(SCRIPTS / "pope.sh"), str(model_dir), str(data)], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "mean F1 over 1 splits" in run.stdout
    ckpt = model_dir.name
    assert sorted(p.name for p in (data / "answers" / ckpt).iterdir()) == ["2_0.jsonl", "2_1.jsonl"]
    merged = [record.data["question_id"] for record in read_jsonl(data / "answers" / f"{ckpt}.jsonl")]
    assert merged == [1, 2, 3]
    assert json.loads((data / "answers" / f"{ckpt}.pope.json").read_text())["num_missing"] == 0
