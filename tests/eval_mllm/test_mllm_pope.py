"""POPE scorer: LLaVA's published numbers on the real files, alignment checks, bad input, edge cases."""

import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest

from mllm_encoder.cli import main
from mllm_encoder.eval.mllm.pope import compare_pope_protocols, evaluate_pope
from mllm_encoder.eval.mllm.protocols import binary_metrics, llava_pope_parse

POPE_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "pope"
# CI always has ../shared: there the real-file checks must run, never skip.
needs_pope_data = pytest.mark.skipif(
    not (POPE_DATA / "llava_pope_test.jsonl").exists() and os.environ.get("CI") != "true",
    reason=f"real POPE files absent from {POPE_DATA}",
)
SUFFIX = "\nAnswer the question using a single word or phrase."


def write_lines(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_pope(tmp_path: Path, splits: dict, id_offsets=None):
    """Write a synthetic POPE set: ``splits`` maps split -> [(object, label, answer or None)]."""
    questions, annotations, answers = [], {}, []
    for index, (split, rows) in enumerate(splits.items()):
        offset = (id_offsets or {}).get(split, 1000 * index)
        annotations[split] = []
        for i, (obj, label, answer) in enumerate(rows, start=1):
            text, image = f"Is there a {obj} in the image?", f"COCO_{i:03d}.jpg"
            annotations[split].append({"question_id": i, "image": image, "text": text, "label": label})
            question = {"question_id": offset + i, "image": image, "text": text + SUFFIX, "category": split}
            questions.append(question)
            if answer is not None:
                answers.append({"question_id": offset + i, "prompt": question["text"], "text": answer})
    for split, records in annotations.items():
        write_lines(tmp_path / "coco" / f"coco_pope_{split}.json", records)
    return (
        tmp_path / "coco",
        write_lines(tmp_path / "questions.jsonl", questions),
        write_lines(tmp_path / "answers.jsonl", answers),
    )


def reference_llava_parse(text):
    """LLaVA's eval_pope.py answer parsing, restated here independently of the parser under test."""
    first_sentence = text[: text.find(".")] if "." in text else text
    return "no" if {"No", "no", "not"} & set(first_sentence.replace(",", "").split(" ")) else "yes"


def reference_eval_pope(answers, labels):
    """LLaVA's eval_pope.py arithmetic, restated independently: answers and labels paired by position."""
    preds = [reference_llava_parse(a["text"]) for a in answers]
    tp = sum(p == "yes" and lab == "yes" for p, lab in zip(preds, labels))
    fp = sum(p == "yes" and lab == "no" for p, lab in zip(preds, labels))
    tn = sum(p == "no" and lab == "no" for p, lab in zip(preds, labels))
    fn = sum(p == "no" and lab == "yes" for p, lab in zip(preds, labels))
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    f1 = 2 * precision * recall / (precision + recall)
    return dict(tp=tp, fp=fp, tn=tn, fn=fn, f1=f1, accuracy=(tp + tn) / (tp + tn + fp + fn))


@needs_pope_data
def test_reproduces_llava_v15_13b_published_numbers(caplog):
    with caplog.at_level(logging.WARNING):
        result = evaluate_pope(
            POPE_DATA / "coco",
            POPE_DATA / "llava_pope_test.jsonl",
            POPE_DATA / "answers" / "llava-v1.5-13b.jsonl",
        )
    assert not result.warnings and not caplog.records
    f1 = {name: round(100 * split.f1, 2) for name, split in result.splits.items()}
    assert f1 == {"adversarial": 84.46, "popular": 86.25, "random": 87.14}
    assert round(100 * result.mean_f1, 1) == 85.9
    assert [s.num_questions for s in result.splits.values()] == [3000, 3000, 2910]
    assert result.num_missing == 0 and result.num_answers == 8910
    adversarial = result.splits["adversarial"]
    assert (adversarial.tp, adversarial.fp, adversarial.tn, adversarial.fn) == (1182, 117, 1383, 318)
    assert adversarial.yes_ratio == pytest.approx(1299 / 3000)
    questions = {q["question_id"]: q for q in map(json.loads, open(POPE_DATA / "llava_pope_test.jsonl"))}
    answers = [json.loads(line) for line in open(POPE_DATA / "answers" / "llava-v1.5-13b.jsonl")]
    for name, split in result.splits.items():
        labels = [json.loads(line)["label"] for line in open(POPE_DATA / "coco" / f"coco_pope_{name}.json")]
        split_answers = [a for a in answers if questions[a["question_id"]]["category"] == name]
        reference = reference_eval_pope(split_answers, labels)
        assert {k: getattr(split, k) for k in reference} == pytest.approx(reference)


@needs_pope_data
def test_annotations_from_wrong_pope_commit_warn_naming_file_and_line(tmp_path, caplog):
    """Newer POPE has 3000 random questions that do not line up with LLaVA's question file."""
    coco = tmp_path / "coco"
    coco.mkdir()
    for split in ("adversarial", "popular"):
        (coco / f"coco_pope_{split}.json").write_bytes((POPE_DATA / "coco" / f"coco_pope_{split}.json").read_bytes())
    random_lines = (POPE_DATA / "coco" / "coco_pope_random.json").read_text().splitlines(keepends=True)
    extra = (POPE_DATA / "coco" / "coco_pope_popular.json").read_text().splitlines(keepends=True)[:90]
    (coco / "coco_pope_random.json").write_text("".join(random_lines[:100] + extra + random_lines[100:]))
    with caplog.at_level(logging.WARNING):
        result = evaluate_pope(
            coco, POPE_DATA / "llava_pope_test.jsonl", POPE_DATA / "answers" / "llava-v1.5-13b.jsonl"
        )
    text = caplog.text
    assert "2910 questions" in text and "3000 lines" in text and "e3e39262" in text
    assert f"{coco / 'coco_pope_random.json'}:101" in text  # first misaligned annotation line is named
    assert result.num_misaligned > 0 and result.splits["random"].num_questions == 2910
    assert round(100 * result.splits["adversarial"].f1, 2) == 84.46  # the other splits are untouched


def test_answer_normalisation_follows_llava():
    cases = {
        "Yes": "yes",
        "Yes, there is": "yes",
        "Yes, there is a dog.": "yes",
        "No": "no",
        "No.": "no",
        "No, there is not.": "no",
        "There is no dog in the image.": "no",
        "not sure": "no",
        "I am not sure.": "no",
        "Yes. No dog though.": "yes",  # only the first sentence counts
        "NO": "yes",  # LLaVA only looks for the words No / no / not
        "Nothing": "yes",
        "": "yes",
    }
    assert {text: llava_pope_parse(text) for text in cases} == cases
    assert {text: reference_llava_parse(text) for text in cases} == cases  # the reference the real-file test uses


def test_all_yes_and_all_no_answers_are_defined():
    labels = ["yes", "no", "yes", "no"]
    all_yes = binary_metrics(["yes"] * 4, labels)
    assert (all_yes["precision"], all_yes["recall"], all_yes["yes_ratio"]) == (0.5, 1.0, 1.0)
    assert all_yes["f1"] == pytest.approx(2 / 3) and all_yes["accuracy"] == 0.5
    all_no = binary_metrics(["no"] * 4, labels)
    assert (all_no["precision"], all_no["recall"], all_no["f1"], all_no["yes_ratio"]) == (0.0, 0.0, 0.0, 0.0)


def test_missing_empty_and_hedged_answers_are_counted_not_scored_as_correct(tmp_path, caplog):
    rows = [
        ("dog", "yes", "Yes, there is"),
        ("cat", "no", "No."),
        ("car", "yes", "not sure"),
        ("cup", "no", ""),
        ("bus", "yes", None),
        ("bed", "no", None),
    ]
    with caplog.at_level(logging.WARNING):
        result = evaluate_pope(*make_pope(tmp_path, {"random": rows}))
    split = result.splits["random"]
    assert (split.num_questions, split.num_answered, split.num_missing, split.num_empty) == (6, 4, 2, 1)
    assert (split.tp, split.fp, split.tn, split.fn) == (1, 1, 1, 1)  # "" -> yes (LLaVA), "not sure" -> no
    assert split.accuracy == 0.5 and split.yes_ratio == 0.5
    assert "questions without an answer" in caplog.text and "empty answers" in caplog.text
    assert result.to_dict()["num_missing"] == 2


def test_malformed_answer_line_names_file_and_line(tmp_path):
    annotation_dir, questions, answers = make_pope(tmp_path, {"random": [("dog", "yes", "Yes")] * 3})
    lines = answers.read_text().splitlines()
    lines[1] = lines[1][:-5]
    answers.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"{answers}:2: malformed JSON"):
        evaluate_pope(annotation_dir, questions, answers)


def test_duplicate_unknown_and_reordered_answers(tmp_path, caplog):
    rows = [("dog", "yes", "Yes"), ("cat", "no", "No"), ("car", "yes", "Yes"), ("cup", "no", "No")]
    annotation_dir, questions, answers = make_pope(tmp_path, {"popular": rows})
    records = [json.loads(line) for line in answers.read_text().splitlines()]
    wrong_duplicate = dict(records[0], text="No")
    unknown = dict(records[0], question_id=99999)
    write_lines(answers, [records[3], records[2], records[1], records[0], wrong_duplicate, unknown])
    with caplog.at_level(logging.WARNING):
        result = evaluate_pope(annotation_dir, questions, answers)
    split = result.splits["popular"]
    assert split.accuracy == 1.0 and split.num_answered == 4  # joined by id; the first duplicate is scored
    assert (result.num_duplicate, result.num_unknown) == (1, 1)
    assert f"{answers}:5" in caplog.text and f"{answers}:6" in caplog.text
    assert "not in question-file order" in caplog.text


def test_answers_from_another_question_set_are_rejected(tmp_path):
    annotation_dir, questions, answers = make_pope(tmp_path, {"random": [("dog", "yes", "Yes")]})
    write_lines(answers, [{"question_id": "other/1.jpg", "prompt": "?", "text": "Yes"}])
    with pytest.raises(ValueError, match="none of its 1 question ids"):
        evaluate_pope(annotation_dir, questions, answers)


def test_prompt_mismatch_warns(tmp_path, caplog):
    annotation_dir, questions, answers = make_pope(tmp_path, {"random": [("dog", "yes", "Yes")]})
    write_lines(answers, [{"question_id": 1, "prompt": "Is there a cat in the image?", "text": "Yes"}])
    with caplog.at_level(logging.WARNING):
        result = evaluate_pope(annotation_dir, questions, answers)
    assert result.num_prompt_mismatch == 1 and f"{answers}:1" in caplog.text


def test_misaligned_question_ids_are_reported(tmp_path, caplog):
    rows = [("dog", "yes", "Yes"), ("cat", "no", "No"), ("car", "yes", "Yes")]
    annotation_dir, questions, answers = make_pope(tmp_path, {"random": rows}, id_offsets={"random": 500})
    annotation = annotation_dir / "coco_pope_random.json"
    records = [json.loads(line) for line in annotation.read_text().splitlines()]
    records[2]["question_id"] = 7
    write_lines(annotation, records)
    with caplog.at_level(logging.WARNING):
        result = evaluate_pope(annotation_dir, questions, answers)
    assert result.num_misaligned == 1  # a constant offset (500) is fine, a jump is not
    assert f"{questions}:3 vs {annotation}:3" in caplog.text


def test_annotation_file_without_questions_is_not_averaged_in(tmp_path, caplog):
    annotation_dir, questions, answers = make_pope(tmp_path, {"random": [("dog", "yes", "Yes")]})
    write_lines(annotation_dir / "coco_pope_popular.json", [{"text": "Is there a cat?", "label": "no"}])
    with caplog.at_level(logging.WARNING):
        result = evaluate_pope(annotation_dir, questions, answers)
    assert list(result.splits) == ["random"] and result.mean_f1 == 1.0
    assert "no question of" in caplog.text and "'popular'" in caplog.text


def test_cli_prints_table_and_writes_every_number(tmp_path, capsys):
    rows = [("dog", "yes", "Yes"), ("cat", "no", "Yes"), ("car", "yes", "No"), ("cup", "no", "No")]
    annotation_dir, questions, answers = make_pope(tmp_path, {"adversarial": rows, "random": rows[:2]})
    output = tmp_path / "out" / "pope.json"
    argv = ["eval", "pope", "--annotation-dir", str(annotation_dir), "--question-file", str(questions)]
    main(argv + ["--result-file", str(answers), "--output", str(output)])
    printed = capsys.readouterr().out
    assert "adversarial" in printed and "random" in printed and "mean F1 over 2 splits" in printed
    report = json.loads(output.read_text())
    assert report["splits"]["adversarial"]["f1"] == 0.5 and report["splits"]["random"]["f1"] == pytest.approx(2 / 3)
    assert report["mean_f1"] == pytest.approx((0.5 + 2 / 3) / 2) and report["protocol"] == "llava"
    assert {"tp", "fp", "tn", "fn", "precision", "recall", "yes_ratio"} <= set(report["splits"]["random"])
    write_lines(answers, [json.loads(line) for line in answers.read_text().splitlines()][:-1])
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--result-file", str(answers), "--strict"])
    assert exit_info.value.code == 1


# --- lmms-eval's and VLMEvalKit's protocols, restated independently of mllm_encoder.eval.mllm.protocols ---


def lmms_eval_reference(texts, labels):
    """lmms_eval/tasks/pope/utils.py: exact lower/strip match per answer, then its aggregation functions."""
    results = []
    for text, label in zip(texts, labels):
        prediction = text.lower().strip()
        results.append({"score": float(prediction == label), "prediction": prediction, "ground_truth": label})
    tp = sum(r["ground_truth"] == "yes" and r["prediction"] == "yes" for r in results)
    fp = sum(r["ground_truth"] == "no" and r["prediction"] == "yes" for r in results)
    fn = sum(r["ground_truth"] == "yes" and r["prediction"] == "no" for r in results)
    precision = tp / (tp + fp) if tp + fp else 0
    recall = tp / (tp + fn) if tp + fn else 0
    return {
        "accuracy": sum(r["score"] for r in results) / len(results),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0,
        "yes_ratio": sum(r["ground_truth"] == "yes" for r in results) / len(results),
    }


def vlmevalkit_extract(text):
    """vlmeval YOrN_Extraction with vlmeval.smp.process_punctuation, ported as written at VLMEvalKit e8e78f05
    (regex quirks included; the period pattern is the one of commit 928a95b0, 2025-05-13)."""
    text = text.lower()
    out = text
    for p in list(';/[]"{}()=+\\_-><@`,?!'):
        if (p + " " in text or " " + p in text) or (re.search(re.compile(r"(\d)(,)(\d)"), text) is not None):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = re.compile(r"(?<!\d)\.(?!\d)").sub("", out, re.UNICODE)
    words = out.split()
    if "yes" in words and "no" not in words:
        return "Yes"
    if "yes" not in words and "no" in words:
        return "No"
    return "Unknown"


def vlmevalkit_reference(texts, labels):
    """vlmeval POPE_rating: F1 with y_pred = (extracted == 'Yes'), acc = mean(extracted == answer)."""
    extracted = [vlmevalkit_extract(t) for t in texts]
    answers = ["Yes" if label == "yes" else "No" for label in labels]
    y_true = np.array([1 if a == "Yes" else 0 for a in answers])
    y_pred = np.array([1 if e == "Yes" else 0 for e in extracted])
    tp, fp = sum((y_true == 1) & (y_pred == 1)), sum((y_true == 0) & (y_pred == 1))
    fn = sum((y_true == 1) & (y_pred == 0))
    precision = tp / (tp + fp) if tp + fp else 0
    recall = tp / (tp + fn) if tp + fn else 0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0
    accuracy = np.mean([a == e for a, e in zip(answers, extracted)])
    return {"accuracy": accuracy, "precision": precision, "recall": recall, "f1": f1}


def shipped_answers_by_split():
    questions = {q["question_id"]: q for q in map(json.loads, open(POPE_DATA / "llava_pope_test.jsonl"))}
    answers = [json.loads(line) for line in open(POPE_DATA / "answers" / "llava-v1.5-13b.jsonl")]
    by_split = {}
    for name in ("adversarial", "popular", "random"):
        labels = [json.loads(line)["label"] for line in open(POPE_DATA / "coco" / f"coco_pope_{name}.json")]
        texts = [a["text"] for a in answers if questions[a["question_id"]]["category"] == name]
        by_split[name] = (texts, labels)
    return by_split


@needs_pope_data
def test_shipped_answers_reproduce_each_protocols_own_scorer():
    """The numbers docs/evaluation.md states for LLaVA-1.5-13B's published answers under the three protocols."""
    comparison = compare_pope_protocols(
        POPE_DATA / "coco", POPE_DATA / "llava_pope_test.jsonl", POPE_DATA / "answers" / "llava-v1.5-13b.jsonl"
    )
    by_split = shipped_answers_by_split()
    all_texts = [t for texts, _ in by_split.values() for t in texts]
    all_labels = [lab for _, labels in by_split.values() for lab in labels]
    for protocol, reference in (("lmms-eval", lmms_eval_reference), ("vlmevalkit", vlmevalkit_reference)):
        result = comparison.results[protocol]
        expected = reference(all_texts, all_labels)
        assert {k: getattr(result.overall, k) for k in expected} == pytest.approx(expected), protocol
        for name, (texts, labels) in by_split.items():
            expected = reference(texts, labels)
            assert {k: getattr(result.splits[name], k) for k in expected} == pytest.approx(expected), (protocol, name)
    llava, lmms, vlmeval = (comparison.results[p] for p in ("llava", "lmms-eval", "vlmevalkit"))
    assert round(100 * llava.headline_f1, 2) == 85.95  # mean of the per-split F1 (LLaVA's published 85.9)
    assert round(100 * lmms.headline_f1, 2) == round(100 * vlmeval.headline_f1, 2) == 85.93  # pooled F1
    assert round(100 * lmms.overall.accuracy, 2) == 86.97 and round(100 * lmms.overall.yes_ratio, 2) == 50.51
    assert (round(100 * lmms.overall.precision, 2), round(100 * lmms.overall.recall, 2)) == (94.48, 78.80)
    assert round(100 * llava.overall.yes_ratio, 2) == 42.12 and vlmeval.overall.yes_ratio is None
    assert comparison.num_scored == 8910 and comparison.disagreements == []  # every answer is "Yes" or "No"


DISAGREEING_ROWS = [  # (object, label, answer): LLaVA / lmms-eval / VLMEvalKit read the answer as
    ("dog", "yes", "Yes"),  # yes / yes / yes
    ("cat", "yes", "Yes, there is a cat."),  # yes / other / yes
    ("car", "yes", "I think yes"),  # yes / other / yes
    ("bus", "yes", "not sure"),  # no / other / other
    ("cup", "no", "No."),  # no / other / no
    ("bed", "no", "NO"),  # yes / no / no
    ("tie", "no", ""),  # yes / other / other
    ("bat", "no", "No, yes"),  # no / other / other
]


def test_protocols_on_answers_they_read_differently(tmp_path):
    splits = {"popular": [("dog", "yes", "Yes"), ("cat", "no", "No")], "random": DISAGREEING_ROWS}
    comparison = compare_pope_protocols(*make_pope(tmp_path, splits))
    llava, lmms, vlmeval = (comparison.results[p] for p in ("llava", "lmms-eval", "vlmevalkit"))
    random = llava.splits["random"]  # TP 3 (1-3), FN 1 (4), FP 2 (6, 7), TN 2 (5, 8)
    assert (random.tp, random.fn, random.fp, random.tn, random.num_other) == (3, 1, 2, 2, 0)
    assert (random.accuracy, random.precision, random.recall) == (0.625, 0.6, 0.75)
    assert random.f1 == pytest.approx(2 / 3) and llava.headline_f1 == pytest.approx((2 / 3 + 1) / 2)
    assert llava.overall.f1 == pytest.approx(8 / 11)  # pooled: TP 4, FP 2, FN 1
    random = lmms.splits["random"]  # only "Yes" (TP) and "NO" (TN) are read; six answers are "other"
    assert (random.tp, random.fp, random.tn, random.fn, random.num_other) == (1, 0, 1, 0, 6)
    assert (random.accuracy, random.precision, random.recall, random.f1, random.yes_ratio) == (0.25, 1, 1, 1, 0.5)
    assert (lmms.headline_f1, lmms.overall.accuracy, lmms.overall.yes_ratio) == (1.0, 0.4, 0.5)
    random = vlmeval.splits["random"]  # TP 3, TN 2 (5, 6), "not sure" (truth yes) counts as a false negative
    assert (random.tp, random.fp, random.tn, random.fn, random.num_other) == (3, 0, 2, 0, 3)
    assert (random.accuracy, random.precision, random.recall) == (0.625, 1, 0.75)
    assert random.f1 == pytest.approx(6 / 7) and vlmeval.headline_f1 == pytest.approx(8 / 9)
    texts, labels = [r[2] for r in DISAGREEING_ROWS], [r[1] for r in DISAGREEING_ROWS]
    for result, reference in ((lmms, lmms_eval_reference), (vlmeval, vlmevalkit_reference)):
        expected = reference(texts, labels)
        assert {k: getattr(result.splits["random"], k) for k in expected} == pytest.approx(expected)
    assert comparison.num_scored == 10 and len(comparison.disagreements) == 7
    first = comparison.disagreements[0]
    assert first.text == "Yes, there is a cat." and first.location.endswith("answers.jsonl:4")
    assert first.parses == {"llava": "yes", "lmms-eval": "other", "vlmevalkit": "yes"}


def test_cli_protocol_all_prints_side_by_side_table_and_disagreements(tmp_path, capsys):
    annotation_dir, questions, answers = make_pope(tmp_path, {"random": DISAGREEING_ROWS})
    output = tmp_path / "all.json"
    main(["eval", "pope", "--annotation-dir", str(annotation_dir), "--question-file", str(questions)]
         + ["--result-file", str(answers), "--protocol", "all", "--output", str(output)])  # fmt: skip
    printed = capsys.readouterr().out
    assert "LLaVA" in printed and "lmms-eval" in printed and "VLMEvalKit" in printed
    assert "7 of 8 answers are read differently" in printed and "'NO' (truth no)" in printed
    report = json.loads(output.read_text())
    assert set(report["protocols"]) == {"llava", "lmms-eval", "vlmevalkit"} and report["num_disagreements"] == 7
    assert report["protocols"]["lmms-eval"]["headline_f1"] == 1.0
    main(["eval", "pope", "--annotation-dir", str(annotation_dir), "--question-file", str(questions)]
         + ["--result-file", str(answers), "--protocol", "vlmevalkit"])  # fmt: skip
    assert "POPE (VLMEvalKit protocol, F1 over all 8 answers): 85.71" in capsys.readouterr().out


def test_non_string_answers_are_reported_and_never_scored(tmp_path, caplog):
    """Issue 9: `"text": 7` and `"text": null` used to be scored as "yes". Issue 21: VLMEvalKit reads str() of
    them ("7", "None": unreadable) and counts them; LLaVA's and lmms-eval's tools raise on them."""
    rows = [("dog", "yes", "Yes"), ("cat", "no", 7), ("car", "yes", "No"), ("cup", "no", None), ("bus", "no", "No")]
    annotation_dir, questions, answers = make_pope(tmp_path, {"random": [(o, lab, "x") for o, lab, _ in rows]})
    records = [json.loads(line) for line in answers.read_text().splitlines()]
    write_lines(answers, [dict(r, text=row[2]) for r, row in zip(records, rows)])
    for protocol in ("llava", "lmms-eval", "vlmevalkit"):
        with caplog.at_level(logging.WARNING):
            result = evaluate_pope(annotation_dir, questions, answers, protocol=protocol)
        split = result.splits["random"]
        counted = protocol == "vlmevalkit"
        assert (split.num_answered, split.num_malformed, split.num_missing) == (5 if counted else 3, 2, 0)
        assert (split.tp, split.fp, split.tn, split.fn, split.num_other) == (1, 0, 1, 1, 2 if counted else 0)
        assert result.num_malformed == 2
        assert [f.split(" (")[0] for f in result.tool_failures] == ([] if counted else [f"{answers}:2", f"{answers}:4"])
        assert any("would not have scored this file" in w for w in result.warnings) != counted
    assert f"{answers}:2 (text is int 7)" in caplog.text and f"{answers}:4 (text is NoneType None)" in caplog.text
    argv = ["eval", "pope", "--annotation-dir", str(annotation_dir), "--question-file", str(questions)]
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--result-file", str(answers), "--strict"])
    assert exit_info.value.code == 1


def test_question_file_with_non_string_fields_names_file_and_line(tmp_path):
    annotation_dir, questions, answers = make_pope(tmp_path, {"random": [("dog", "yes", "Yes"), ("cat", "no", "No")]})
    records = [json.loads(line) for line in questions.read_text().splitlines()]
    write_lines(questions, [records[0], dict(records[1], text=5)])
    with pytest.raises(ValueError, match=rf"{questions}:2: text must be a string"):
        evaluate_pope(annotation_dir, questions, answers)
    write_lines(questions, [dict(records[0], question_id=[1]), records[1]])
    with pytest.raises(ValueError, match=rf"{questions}:1: question_id must be an integer or a string"):
        evaluate_pope(annotation_dir, questions, answers)
