"""MME scorer on a synthetic MME release tree (both ground-truth layouts) with hand-computed scores."""

import json
import logging
from pathlib import Path

import pytest

from mllm_encoder.cli import main
from mllm_encoder.eval.mllm.mme import compare_mme_protocols, evaluate_mme, load_mme_ground_truth
from mllm_encoder.eval.mllm.protocols import mme_calculation_parse

SUFFIX = "\nAnswer the question using a single word or phrase."

# (category, image, question, ground truth, answer or None for no answer)
ITEMS = [
    # existence, flat layout: acc 3/4, acc+ 1/2 -> 75 + 50 = 125
    ("existence", "000000.jpg", "Is there a dog in this image?", "Yes", "Yes"),
    ("existence", "000000.jpg", "Is there a cat in this image?", "No", "No"),
    ("existence", "000001.jpg", "Is there a car in this image?", "No", "Yes, it is"),
    ("existence", "000001.jpg", "Is there a bus in this image?", "Yes", "yes"),
    # artwork, images/ + questions_answers_YN/ layout: acc 5/6, acc+ 2/3 -> 83.33 + 66.67 = 150
    ("artwork", "10002.jpg", "Is this artwork created by monet?", "Yes", "Yes"),
    ("artwork", "10002.jpg", "Is this artwork created by manet?", "No", "No"),
    (
        "artwork",
        "10003.jpg",
        "Does this artwork exist in the form of painting?",
        "Yes",
        "I think so",
    ),  # other
    ("artwork", "10003.jpg", "Does this artwork exist in the form of tapestry?", "No", "No"),
    ("artwork", "10004.jpg", "Is this artwork titled sorrow?", "No", "no"),
    ("artwork", "10004.jpg", "Is this artwork titled joy?", "Yes", "Yes"),
    # code_reasoning (cognition), flat, one answer missing: acc 3/4, acc+ 1/2 -> 125
    ("code_reasoning", "0001.png", "Is a python code shown in the picture?", "Yes", "Yes"),
    ("code_reasoning", "0001.png", "Is a c++ code shown in the picture?", "No", "No"),
    ("code_reasoning", "0002.png", "Is the output of the code '7'?", "Yes", None),
    ("code_reasoning", "0002.png", "Is the output of the code '1'?", "No", "No"),
]
DOUBLE_SPACE = {"Is the output of the code '7'?"}  # some MME files have two spaces before "Please answer"


def image_path(category: str, image: str) -> str:
    return f"{category}/images/{image}" if category == "artwork" else f"{category}/{image}"


def build_mme(root: Path, items=ITEMS):
    """Write an MME release tree, LLaVA's question file and an answer file; return their paths."""
    release = root / "MME_Benchmark_release_version"
    truth = {}
    for category, image, question, gt, _ in items:
        if category == "artwork":
            image_file, qa_dir = (
                release / category / "images" / image,
                release / category / "questions_answers_YN",
            )
        else:
            image_file, qa_dir = release / category / image, release / category
        image_file.parent.mkdir(parents=True, exist_ok=True)
        image_file.write_bytes(b"")
        separator = "  " if question in DOUBLE_SPACE else " "
        truth.setdefault(qa_dir / (image.split(".")[0] + ".txt"), []).append(
            f"{question}{separator}Please answer yes or no.\t{gt}\n"
        )
    for path, lines in truth.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(lines))
    questions, answers = [], []
    for category, image, question, _, answer in items:
        record = {"question_id": image_path(category, image), "image": image_path(category, image)}
        record.update(text=question + SUFFIX, category=category)
        questions.append(record)
        if answer is not None:
            answers.append({"question_id": record["question_id"], "prompt": record["text"], "text": answer})
    question_file, answer_file = root / "llava_mme.jsonl", root / "answers.jsonl"
    question_file.write_text("".join(json.dumps(q) + "\n" for q in questions))
    answer_file.write_text("".join(json.dumps(a) + "\n" for a in answers))
    return release, question_file, answer_file


def test_answer_parsing_follows_mme_calculation():
    cases = {
        "Yes": "yes",
        "No": "no",
        "yes, it is": "yes",
        "No, it is not.": "no",
        "Not really": "no",
        "nope": "no",
        "noyes": "no",
        "I think yes": "other",
        "The answer is no": "other",
        "": "other",
    }
    assert {text: mme_calculation_parse(text) for text in cases} == cases


def test_hand_computed_scores_on_both_layouts(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        result = evaluate_mme(*build_mme(tmp_path))
    assert list(result.subtasks) == ["existence", "artwork", "code_reasoning"]
    existence, artwork, code = (result.subtasks[name] for name in result.subtasks)
    assert (existence.acc, existence.acc_plus, existence.score) == (0.75, 0.5, 125.0)
    assert (artwork.acc, artwork.acc_plus) == (pytest.approx(5 / 6), pytest.approx(2 / 3))
    assert artwork.score == pytest.approx(150.0) and artwork.num_other == 1 and artwork.num_images == 3
    assert (code.acc, code.acc_plus, code.score, code.num_missing) == (0.75, 0.5, 125.0, 1)
    assert result.perception == pytest.approx(275.0) and result.cognition == pytest.approx(125.0)
    assert (existence.tp, existence.fp, existence.tn, existence.fn) == (2, 1, 1, 0)
    assert "questions without an answer" in caplog.text and "code_reasoning: 1" in caplog.text
    report = result.to_dict()
    assert report["total"] == pytest.approx(400.0) and report["num_missing"] == 1
    assert "OCR" in report["missing_subtasks"] and "existence" not in report["missing_subtasks"]


def test_ground_truth_layouts_and_double_space_fallback(tmp_path):
    release, _, _ = build_mme(tmp_path)
    truth = load_mme_ground_truth(release)
    assert truth[("artwork", "10002.txt")]["Is this artwork created by monet? Please answer yes or no."] == "yes"
    assert truth[("existence", "000001.txt")]["Is there a car in this image? Please answer yes or no."] == "no"
    assert "Is the output of the code '7'?  Please answer yes or no." in truth[("code_reasoning", "0002.txt")]


def test_two_questions_per_image_are_paired_by_image_not_by_line(tmp_path, caplog):
    """Interleaved questions: pairing consecutive lines (official tool) mixes images; by image does not."""
    items = [ITEMS[0], ITEMS[2], ITEMS[1], ITEMS[3]]  # image 0, image 1, image 0, image 1
    with caplog.at_level(logging.WARNING):
        result = evaluate_mme(*build_mme(tmp_path, items))
    existence = result.subtasks["existence"]
    assert (existence.num_images, existence.num_images_both_correct, existence.score) == (2, 1, 125.0)
    single = evaluate_mme(*build_mme(tmp_path / "single", ITEMS[:3]))
    assert "000001.jpg (1 questions)" in " ".join(single.warnings)


def test_bad_ground_truth_and_unknown_questions_name_file_and_line(tmp_path):
    release, questions, answers = build_mme(tmp_path)
    truth_file = release / "existence" / "000000.txt"
    truth_file.write_text(truth_file.read_text() + "Is there a cow?\tMaybe\n")
    with pytest.raises(ValueError, match=rf"{truth_file}:3: expected"):
        evaluate_mme(release, questions, answers)
    release, questions, answers = build_mme(tmp_path / "fresh")
    lines = questions.read_text().splitlines()
    lines[4] = lines[4].replace("monet", "picasso")
    questions.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"{questions}:5: no MME ground truth"):
        evaluate_mme(release, questions, answers)
    questions.write_text(json.dumps({"question_id": 1, "text": "Q?"}) + "\n")
    with pytest.raises(ValueError, match=rf"{questions}:1: MME question_id must be an image path"):
        evaluate_mme(release, questions, answers)
    questions.write_text(json.dumps({"question_id": "existence/000000.jpg", "text": ["Q?"]}) + "\n")
    with pytest.raises(ValueError, match=rf"{questions}:1: text must be a string"):
        evaluate_mme(release, questions, answers)


def test_duplicate_and_unknown_answers_warn(tmp_path, caplog):
    release, questions, answers = build_mme(tmp_path)
    records = [json.loads(line) for line in answers.read_text().splitlines()]
    records += [dict(records[0], text="No"), dict(records[0], prompt="Is it?")]
    answers.write_text("".join(json.dumps(r) + "\n" for r in records))
    with caplog.at_level(logging.WARNING):
        result = evaluate_mme(release, questions, answers)
    assert (result.num_duplicate, result.num_unknown) == (1, 1)
    assert f"{answers}:14" in caplog.text and f"{answers}:15" in caplog.text
    assert result.subtasks["existence"].score == 125.0  # the first answer is the one scored


def test_cli_table_and_json(tmp_path, capsys):
    release, questions, answers = build_mme(tmp_path)
    output = tmp_path / "mme.json"
    argv = ["eval", "mme", "--mme-root", str(release), "--question-file", str(questions), "--result-file"]
    main(argv + [str(answers), "--output", str(output)])
    printed = capsys.readouterr().out
    assert "MME perception (2/10 subtasks): 275.00" in printed and "artwork" in printed
    assert "MME cognition (1/4 subtasks): 125.00" in printed
    report = json.loads(output.read_text())
    assert report["perception"] == pytest.approx(275.0) and report["cognition"] == pytest.approx(125.0)
    assert report["subtasks"]["artwork"]["num_other"] == 1 and report["protocol"] == "llava"


# Answers the three parsers read differently; (LLaVA/official, lmms-eval, VLMEvalKit) correct? in the comments.
PROTOCOL_ITEMS = [
    ("existence", "000000.jpg", "Is there a dog in this image?", "Yes", "Yes"),  # all right
    ("existence", "000000.jpg", "Is there a cat in this image?", "No", "No"),  # all right
    ("existence", "000001.jpg", "Is there a car in this image?", "Yes", "y"),  # other / yes / other
    ("existence", "000001.jpg", "Is there a bus in this image?", "No", "n"),  # other / no / other
    ("existence", "000002.jpg", "Is there a cup in this image?", "Yes", "I think yes"),  # other / other / yes
    ("existence", "000002.jpg", "Is there a tie in this image?", "No", "The answer is no."),  # other / other / no
    ("existence", "000003.jpg", "Is there a bed in this image?", "No", "Not at all"),  # no / no / other
    ("existence", "000003.jpg", "Is there a bat in this image?", "Yes", "Yes."),  # all right
    ("code_reasoning", "0001.png", "Is the output of the code '3'?", "No", "None"),  # no / no / other
    ("code_reasoning", "0001.png", "Is a python code shown in the picture?", "Yes", "yes"),  # all right
]


def test_three_parsers_on_hand_computed_scores(tmp_path):
    comparison = compare_mme_protocols(*build_mme(tmp_path, PROTOCOL_ITEMS))
    scores = {
        name: (r.subtasks["existence"].score, r.subtasks["code_reasoning"].score, r.perception, r.cognition)
        for name, r in comparison.results.items()
    }
    # existence: official 4/8 right, 2/4 images both right -> 50 + 50; lmms-eval 6/8, 3/4 -> 75 + 75;
    # VLMEvalKit 5/8, 2/4 -> 62.5 + 50. code_reasoning: 200, 200, and 50 + 0 for VLMEvalKit ("None" unread).
    assert scores == {
        "llava": (100.0, 200.0, 100.0, 200.0),
        "lmms-eval": (150.0, 200.0, 150.0, 200.0),
        "vlmevalkit": (112.5, 50.0, 112.5, 50.0),
    }
    num_other = {name: r.subtasks["existence"].num_other for name, r in comparison.results.items()}
    assert num_other == {"llava": 4, "lmms-eval": 2, "vlmevalkit": 3}
    assert comparison.num_scored == 10 and len(comparison.disagreements) == 6
    texts = [d.text for d in comparison.disagreements]
    assert texts == ["y", "n", "I think yes", "The answer is no.", "Not at all", "None"]
    assert comparison.disagreements[0].parses == {"llava": "other", "lmms-eval": "yes", "vlmevalkit": "other"}
    assert evaluate_mme(*build_mme(tmp_path / "one", PROTOCOL_ITEMS), protocol="lmms-eval").perception == 150.0


def test_cli_protocol_all_and_single(tmp_path, capsys):
    release, questions, answers = build_mme(tmp_path, PROTOCOL_ITEMS)
    argv = ["eval", "mme", "--mme-root", str(release), "--question-file", str(questions), "--result-file"]
    output = tmp_path / "all.json"
    main(argv + [str(answers), "--protocol", "all", "--output", str(output)])
    printed = capsys.readouterr().out
    assert "VLMEvalKit" in printed and "6 of 10 answers are read differently" in printed
    assert "answers.jsonl:3: 'y' (truth yes) -> LLaVA: other, lmms-eval: yes, VLMEvalKit: other" in printed
    report = json.loads(output.read_text())
    assert report["protocols"]["vlmevalkit"]["perception"] == 112.5 and report["num_disagreements"] == 6
    main(argv + [str(answers), "--protocol", "lmms-eval"])
    assert "MME perception (1/10 subtasks, lmms-eval answer parsing): 150.00" in capsys.readouterr().out


def test_non_string_answers_are_reported_and_never_parsed(tmp_path, caplog):
    """Issue 9: `"text": null` used to be parsed as "no" (right when the truth is no)."""
    release, questions, answers = build_mme(tmp_path)
    records = [json.loads(line) for line in answers.read_text().splitlines()]
    records[1]["text"] = None  # existence image 0, truth "No": was scored right
    records[3]["text"] = ["yes"]
    answers.write_text("".join(json.dumps(r) + "\n" for r in records))
    with caplog.at_level(logging.WARNING):
        result = evaluate_mme(release, questions, answers)
    existence = result.subtasks["existence"]
    assert (existence.num_missing, existence.num_correct, existence.num_images_both_correct) == (2, 1, 0)
    assert existence.score == 25.0 and result.num_malformed == 2
    assert (
        f"{answers}:2 (text is NoneType None)" in caplog.text and f"{answers}:4 (text is list ['yes'])" in caplog.text
    )
    argv = ["eval", "mme", "--mme-root", str(release), "--question-file", str(questions), "--result-file"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv + [str(answers), "--strict"])
    assert exit_info.value.code == 1


def test_subtasks_without_answers_are_reported_per_protocol(tmp_path, capsys):
    """code_reasoning unanswered (and 11 subtasks not in the question file): MME's calculation.py and VLMEvalKit's
    MME_rating raise on them, lmms-eval sums the rest (the numbers here); --strict fails."""
    items = [item[:4] + (None,) if item[0] == "code_reasoning" else item for item in ITEMS]
    release, questions, answers = build_mme(tmp_path, items)
    argv = ["eval", "mme", "--mme-root", str(release), "--question-file", str(questions), "--result-file"]
    output = tmp_path / "all.json"
    main(argv + [str(answers), "--protocol", "all", "--output", str(output)])
    report = json.loads(output.read_text())["protocols"]
    absent = ["count", "position", "color", "posters", "celebrity", "scene", "landmark", "OCR"]
    absent += ["commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"]
    where = f"{answers}: no answers to MME subtasks {', '.join(absent)}: "
    assert report["llava"]["tool_failures"] == [
        where + "LLaVA's convert_answer_to_mme.py writes no file for them and MME's calculation.py raises "
        "FileNotFoundError (count.txt)"
    ]
    assert report["vlmevalkit"]["tool_failures"] == [where + "VLMEvalKit's MME_rating raises KeyError ('OCR')"]
    assert report["lmms-eval"]["tool_failures"] == []
    for protocol in report.values():
        assert protocol["subtasks_without_answers"] == absent
        assert protocol["subtasks"]["code_reasoning"]["score"] == 0.0 and protocol["cognition"] == 0.0
    assert report["llava"]["perception"] == pytest.approx(275.0)  # existence 125 + artwork 150, as before
    with pytest.raises(SystemExit) as exit_info:
        main(argv + [str(answers), "--protocol", "lmms-eval", "--strict"])
    assert exit_info.value.code == 1
