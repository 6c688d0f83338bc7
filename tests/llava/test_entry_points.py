"""``python -m llava_patch.serve.cli`` and ``python -m llava_patch.eval.model_vqa_loader`` run LLaVA's scripts."""

import json
import os
import subprocess
import sys

import torch
from llava_runs import REPO_ROOT
from PIL import Image


def _run(args, stdin=""):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-m", *args], input=stdin, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout


def test_cli_chat_answers_about_an_image(tiny_llava_dir, tmp_path):
    image = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (200, 20, 20)).save(image)
    args = ["llava_patch.serve.cli", "--model-path", str(tiny_llava_dir), "--image-file", str(image)]
    args += ["--device", "cpu", "--temperature", "0"]

    def answer(max_new_tokens: int) -> str:
        output = _run([*args, "--max-new-tokens", str(max_new_tokens)], stdin="What color is the image?\n")
        # LLaVA's chat loop: a prompt, the streamed answer, then "exit..." at the end of the input.
        assert "ASSISTANT:" in output.upper() and output.rstrip().endswith("exit...")
        turn = output[output.upper().index("ASSISTANT:") + len("ASSISTANT:") : output.rstrip().rindex("exit...")]
        return turn.rsplit("\n", 1)[0]  # the streamed answer, without the next turn's prompt

    short, longer = answer(4), answer(12)
    # greedy decoding of the model: a non-empty answer, and a longer budget continues the same tokens
    assert short.strip() and longer.strip() and len(longer) > len(short)
    assert longer.startswith(short)


def test_vqa_loader_entry_point_runs_llava_script():
    output = _run(["llava_patch.eval.model_vqa_loader", "--help"])
    assert "--model-path" in output and "--answers-file" in output


def test_vqa_loader_takes_a_bare_answers_file_name(tiny_llava_dir, tmp_path):
    """docs/llava.md's ``--answers-file answers.jsonl`` (issue 23: LLaVA made the empty folder name and failed).

    LLaVA's script creates the answers file before answering, and answers on CUDA only: without CUDA the run
    must get that far (the file exists) and stop at CUDA, not at the file name."""
    Image.new("RGB", (40, 30), (200, 20, 20)).save(tmp_path / "red.png")
    question = {"question_id": 0, "image": "red.png", "text": "What color is the image?"}
    (tmp_path / "questions.jsonl").write_text(json.dumps(question) + "\n")
    args = [sys.executable, "-m", "llava_patch.eval.model_vqa_loader", "--model-path", str(tiny_llava_dir)]
    args += ["--question-file", "questions.jsonl", "--image-folder", ".", "--answers-file", "answers.jsonl"]
    args += ["--temperature", "0", "--conv-mode", "vicuna_v1", "--max_new_tokens", "2"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    log = (result.stdout + result.stderr)[-4000:]
    assert (tmp_path / "answers.jsonl").exists(), log
    if torch.cuda.is_available():
        assert result.returncode == 0, log
        assert [json.loads(line)["question_id"] for line in (tmp_path / "answers.jsonl").open()] == [0]
    else:
        assert result.returncode != 0 and "FileNotFoundError" not in log and "CUDA" in log, log
