"""A real ``python -m lmms_eval eval`` of a tiny CLIP-MoE LLaVA through the ``clip_moe_llava`` plug-in, on the
local POPE-format task of ``tests/lmms_eval_tasks`` (lmms-eval's own POPE functions), whose numbers must equal
``clip-moe eval pope --protocol lmms-eval`` on the answers lmms-eval logged. Needs the real lmms-eval
(``make test-lmms`` builds that environment); skipped elsewhere."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from llava_fixtures import build_tiny_llava, build_tiny_tokenizer, synthetic_image
from safetensors.torch import load_file, save_file

pytest.importorskip("lmms_eval.evaluator", reason="needs the real lmms-eval (make test-lmms)")
pytest.importorskip("datasets")

REPO_ROOT = Path(__file__).resolve().parents[2]
TASKS = REPO_ROOT / "tests" / "lmms_eval_tasks"
ANSWER_TOKENS = ("Yes", "No", "yes", "no", "</s>", ".")  # in pairs: (+v, -v), so one of a pair always wins
SPLITS = ("adversarial", "popular", "random")
OBJECTS = ("cat", "dog", "car", "person", "chair", "cup")


def build_yes_no_llava(out_dir: Path, rows: list) -> Path:
    """A tiny LLaVA-1.5 checkpoint whose LM head only ever picks Yes / No / yes / no / end / '.': free-form answers
    to ``rows`` (their questions and images), some of which lmms-eval reads and some it does not.

    The head's rows are +-v for the directions v along which the last hidden states of ``rows`` vary most, so
    which token wins depends on the image and the question."""
    from llava_patch.integrations.answerer import LlavaAnswerer

    build_tiny_llava(out_dir)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (out_dir / name).unlink(missing_ok=True)
    tokenizer = build_tiny_tokenizer(out_dir, user_defined_symbols=ANSWER_TOKENS[:4])
    ids = tokenizer.convert_tokens_to_ids(list(ANSWER_TOKENS))
    answerer = LlavaAnswerer(str(out_dir), "", device="cpu")
    states = []
    with torch.no_grad():
        for row in rows:
            pixels = answerer.mm_utils.process_images([row["image"]], answerer.image_processor, answerer.model.config)
            prompt = answerer.build_prompt(f"{row['question']}\nAnswer the question using a single word or phrase.")
            input_ids = answerer.mm_utils.tokenizer_image_token(
                prompt, answerer.tokenizer, answerer.constants.IMAGE_TOKEN_INDEX, return_tensors="pt"
            ).unsqueeze(0)
            output = answerer.model(
                input_ids=input_ids, images=pixels, image_sizes=[row["image"].size], output_hidden_states=True
            )
            states.append(output.hidden_states[-1][0, -1])
    centred = torch.stack(states) - torch.stack(states).mean(0)
    directions = torch.linalg.svd(centred, full_matrices=False).Vh[: len(ids) // 2] * 50.0
    (weights_file,) = out_dir.glob("*.safetensors")
    weights = load_file(str(weights_file))
    head = torch.zeros_like(weights["lm_head.weight"])
    for pair, direction in enumerate(directions):
        head[ids[2 * pair]], head[ids[2 * pair + 1]] = direction, -direction
    weights["lm_head.weight"] = head
    save_file(weights, str(weights_file), metadata={"format": "pt"})
    return out_dir


def write_pope_parquet(path: Path, questions_per_split: int = 4) -> list:
    """The local task's data: lmms-lab POPE's columns, synthetic images of several sizes; returns the rows."""
    import datasets

    rows = []
    for split_index, split in enumerate(SPLITS):
        for index in range(questions_per_split):
            number = split_index * questions_per_split + index
            image = synthetic_image(("red", "green", "blue", "yellow")[number % 4], 24 + 8 * (number % 3), number)
            rows.append(
                dict(
                    question_id=str(number + 1),
                    question=f"Is there a {OBJECTS[number % len(OBJECTS)]} in the image?",
                    answer=("yes", "no")[(number // 2) % 2],
                    image=image,
                    category=split,
                    image_source=f"synthetic_{number}",
                )
            )
    features = datasets.Features(
        question_id=datasets.Value("string"),
        question=datasets.Value("string"),
        answer=datasets.Value("string"),
        image=datasets.Image(),
        category=datasets.Value("string"),
        image_source=datasets.Value("string"),
    )
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))
    return rows


def write_llava_pope_files(rows: list, samples: list, root: Path) -> dict:
    """The same questions as LLaVA's POPE files (question file, coco_pope_<split>.json) and lmms-eval's logged
    answers as a LLaVA answer file, for ``clip-moe eval pope``."""
    (root / "coco").mkdir(parents=True)
    prompt = "{}\nAnswer the question using a single word or phrase."
    questions = [
        dict(question_id=int(r["question_id"]), image=f"{r['image_source']}.png", text=prompt.format(r["question"]),
             category=r["category"])
        for r in rows
    ]  # fmt: skip
    (root / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    for split in SPLITS:
        lines = [dict(text=r["question"], label=r["answer"]) for r in rows if r["category"] == split]
        (root / "coco" / f"coco_pope_{split}.json").write_text("".join(json.dumps(a) + "\n" for a in lines))
    answers = [
        dict(question_id=int(rows[s["doc_id"]]["question_id"]), prompt=questions[s["doc_id"]]["text"],
             text=s["filtered_resps"])
        for s in samples
    ]  # fmt: skip
    answers.sort(key=lambda a: a["question_id"])
    (root / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    return dict(answers=answers)


@pytest.mark.slow
def test_lmms_eval_run_equals_clip_moe_eval_pope(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    rows = write_pope_parquet(work / "pope_local.parquet")
    checkpoint = build_yes_no_llava(tmp_path / "llava-tiny-clip-moe", rows)
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "lmms_eval", "eval", "--model", "clip_moe_llava",
               "--model_args", f"pretrained={checkpoint},device=cpu", "--tasks", "pope_local",
               "--include_path", str(TASKS), "--batch_size", "1", "--log_samples",
               "--output_path", str(work / "logs")]  # fmt: skip
    run = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    log = (run.stdout + run.stderr)[-6000:]
    assert run.returncode == 0, log
    # lmms-eval exits 0 when the evaluation failed: the result and sample files are the evidence
    results_files = list((work / "logs").rglob("*_results.json"))
    samples_files = list((work / "logs").rglob("*_samples_pope_local.jsonl"))
    assert len(results_files) == 1 and len(samples_files) == 1, log
    results_file, samples_file = results_files[0], samples_files[0]
    metrics = json.loads(results_file.read_text())["results"]["pope_local"]
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == len(rows) and all(isinstance(s["filtered_resps"], str) for s in samples), samples[0]
    files = write_llava_pope_files(rows, samples, tmp_path / "pope")
    texts = [a["text"].lower().strip() for a in files["answers"]]
    assert {"yes", "no"} <= set(texts) and set(texts) - {"yes", "no"}, texts  # readable and unreadable answers

    report = tmp_path / "pope.json"
    score = [sys.executable, "-m", "mllm_encoder", "eval", "pope", "--protocol", "lmms-eval",
             "--annotation-dir", str(tmp_path / "pope" / "coco"), "--question-file",
             str(tmp_path / "pope" / "questions.jsonl"), "--result-file", str(tmp_path / "pope" / "answers.jsonl"),
             "--output", str(report)]  # fmt: skip
    scored = subprocess.run(score, env=env, capture_output=True, text=True, timeout=300)
    assert scored.returncode == 0, scored.stderr[-3000:]
    overall = json.loads(report.read_text())["overall"]
    assert overall["num_answered"] == len(rows)
    assert metrics["pope_accuracy,none"] == pytest.approx(overall["accuracy"], abs=1e-12)
    assert metrics["pope_precision,none"] == pytest.approx(overall["precision"], abs=1e-12)
    assert metrics["pope_recall,none"] == pytest.approx(overall["recall"], abs=1e-12)
    assert metrics["pope_f1_score,none"] == pytest.approx(overall["f1"], abs=1e-12)
    assert metrics["pope_yes_ratio,none"] == pytest.approx(overall["yes_ratio"], abs=1e-12)
