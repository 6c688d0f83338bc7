"""Awkward POPE and MME answers for the protocol conformance test (``test_mllm_conformance.py``), and writers of
the files each scorer reads."""

import json
from pathlib import Path

POPE_SPLITS = ("adversarial", "popular", "random")
# (truth, answer) per split, in question order: case, punctuation, white space and Unicode spaces, sentences,
# hedges, empty answers, periods next to digits
POPE_ANSWERS = {
    "adversarial": [
        ("yes", "Yes"), ("no", "No"), ("yes", "YES"), ("no", "NO"), ("yes", "Yes."), ("no", "No."),
        ("yes", " Yes "), ("no", "no"),
    ],
    "popular": [
        ("yes", "Yes, there is"), ("yes", "Yes, there is a dog."), ("no", "There is no dog."),
        ("no", "No, there is not."), ("yes", "not sure"), ("no", ""), ("yes", "\u00a0Yes"), ("no", "No\u2009"),
    ],
    "random": [
        ("yes", "Yes\n"), ("no", "No\t"), ("yes", "I think yes"), ("no", "No, yes"), ("no", "Nope"),
        ("no", "The answer is no"), ("yes", "yes 1.5."), ("no", "no.5"),
    ],
}  # fmt: skip

MME_SUBTASKS = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
    "commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning",
)  # fmt: skip
# two (truth, answer) pairs per subtask (one image each), in MME_SUBTASKS order
MME_ANSWERS = [
    ("Yes", "Yes"), ("No", "No"),
    ("Yes", "yes"), ("No", "NO"),
    ("Yes", "Yes, it is."), ("No", "No, it is not."),
    ("Yes", "y"), ("No", "no!"),
    ("Yes", "I think yes"), ("No", "NO."),
    ("Yes", "Not at all"), ("No", "None"),
    ("Yes", " yes"), ("No", "no."),
    ("Yes", "Yes."), ("No", ""),
    ("Yes", "\u00a0Yes"), ("No", "Nope"),
    ("Yes", "YES!"), ("No", "no way"),
    ("Yes", "yes, no"), ("No", "No, yes"),
    ("Yes", "Sure"), ("No", "no idea"),
    ("Yes", "Yes 2.5."), ("No", "No 3."),
    ("Yes", "yes"), ("No", "Yes"),
]  # fmt: skip


def write_pope(root: Path, answers=POPE_ANSWERS) -> dict:
    """LLaVA's POPE question file, ``coco/coco_pope_<split>.json`` and a LLaVA answer file (question order)."""
    (root / "coco").mkdir(parents=True, exist_ok=True)
    questions, records, question_id = [], [], 0
    for split in POPE_SPLITS:
        lines = []
        for index, (truth, answer) in enumerate(answers[split]):
            question_id += 1
            text = f"Is there a thing{index} in the image?"
            prompt = text + "\nAnswer the question using a single word or phrase."
            questions.append(dict(question_id=question_id, image=f"{split}{index}.jpg", text=prompt, category=split))
            lines.append(dict(question_id=question_id, image=f"{split}{index}.jpg", text=text, label=truth))
            records.append(dict(question_id=question_id, prompt=prompt, text=answer))
        (root / "coco" / f"coco_pope_{split}.json").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (root / "questions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in questions))
    (root / "answers.jsonl").write_text("".join(json.dumps(x) + "\n" for x in records))
    return dict(
        annotation_dir=root / "coco", question_file=root / "questions.jsonl", result_file=root / "answers.jsonl"
    )


def write_mme(root: Path, answers=MME_ANSWERS) -> dict:
    """An MME release tree (flat layout), LLaVA's question file and a LLaVA answer file, one image per subtask."""
    release = root / "MME_Benchmark_release_version"
    questions, records = [], []
    for number, subtask in enumerate(MME_SUBTASKS):
        (release / subtask).mkdir(parents=True, exist_ok=True)
        (release / subtask / "0001.png").write_bytes(b"")
        truth_lines = []
        for which in range(2):
            truth, answer = answers[2 * number + which]
            question = f"Is this picture number {which}? Please answer yes or no."
            truth_lines.append(f"{question}\t{truth}\n")
            prompt = question.replace(" Please answer yes or no.", "") + (
                "\nAnswer the question using a single word or phrase."
            )
            question_id = f"{subtask}/0001.png"
            questions.append(dict(question_id=question_id, image=question_id, text=prompt, category=subtask))
            records.append(dict(question_id=question_id, prompt=prompt, text=answer))
        (release / subtask / "0001.txt").write_text("".join(truth_lines))
    (root / "llava_mme.jsonl").write_text("".join(json.dumps(x) + "\n" for x in questions))
    (root / "answers.jsonl").write_text("".join(json.dumps(x) + "\n" for x in records))
    return dict(mme_root=release, question_file=root / "llava_mme.jsonl", result_file=root / "answers.jsonl")
