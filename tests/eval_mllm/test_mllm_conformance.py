"""Each protocol equals its tool on awkward answers (``conformance_sets.py``): the numbers below were computed by
running the peers' own code, unmodified, on these files (in a scratch folder, 2026-12-06), not by reasoning:

* LLaVA: ``llava/eval/eval_pope.py`` of llava-torch 1.2.2.post1 (= haotian-liu/LLaVA c121f043), run as its
  ``pope.sh`` does; ``playground/data/eval/MME/convert_answer_to_mme.py`` (haotian-liu/LLaVA 32cebc38) and MME's
  official ``eval_tool/calculation.py`` (``tools/eval_tool.zip`` of BradyFU/Awesome-Multimodal-Large-Language-Models
  1c1d69e1), run as LLaVA's ``mme.sh`` does (scikit-learn 1.9.1);
* lmms-eval 0.7.3: ``lmms_eval/tasks/pope/utils.py`` (``pope_process_results``, ``pope_aggregate_*``) and
  ``lmms_eval/tasks/mme/utils.py`` (``mme_process_results``, ``mme_aggregate_results``);
* VLMEvalKit e8e78f05 (2026-08-18): ``vlmeval/dataset/image_yorn.py``'s ``evaluate`` steps with exact matching
  (``str()`` of each prediction, ``YOrN_Extraction``, score = answer == extracted), ``POPE_rating`` and
  ``MME_rating`` of ``vlmeval/dataset/utils/yorn.py``, ``process_punctuation`` of ``vlmeval/smp/misc.py``.

A drift of a peer (or of this project) from these numbers fails here. Where the tools raise instead of scoring
(also run): LLaVA's ``eval_pope.py`` and lmms-eval's POPE/MME utils raise ``AttributeError`` on ``null`` and ``7``;
LLaVA's MME route raises ``TypeError`` on them (``convert_answer_to_mme.py``) and ``ValueError`` on answers with
``\\n``, ``\\r`` or ``\\t`` (``calculation.py``); VLMEvalKit reads ``str()`` of them. With subtasks absent from
the answers (``MME_ABSENT_PEERS``; run the same way on 2026-12-06 with the same versions): ``calculation.py``
raises ``FileNotFoundError`` on the first absent subtask's file (``convert_answer_to_mme.py`` writes none),
``MME_rating`` raises ``KeyError`` on the first in its order, lmms-eval sums the subtasks it has.
"""

import json

import pytest
from conformance_sets import MME_SUBTASKS, write_mme, write_pope

from mllm_encoder.eval.mllm.mme import evaluate_mme
from mllm_encoder.eval.mllm.pope import evaluate_pope

# fractions; LLaVA per split, lmms-eval and VLMEvalKit pooled ("all") and per split
POPE_PEERS = {
    "llava": {
        "adversarial": dict(accuracy=0.875, precision=0.8, recall=1.0, f1=0.888888888888889, yes_ratio=0.625),
        "popular": dict(accuracy=0.625, precision=0.6, recall=0.75, f1=0.6666666666666665, yes_ratio=0.625),
        "random": dict(accuracy=0.75, precision=0.6, recall=1.0, f1=0.7499999999999999, yes_ratio=0.625),
    },
    "lmms-eval": {
        "all": dict(accuracy=0.4166666666666667, precision=1.0, recall=1.0, f1=1.0, yes_ratio=0.4583333333333333),
        "adversarial": dict(accuracy=0.75, precision=1.0, recall=1.0, f1=1.0, yes_ratio=0.5),
        "popular": dict(accuracy=0.25, precision=1.0, recall=1.0, f1=1.0, yes_ratio=0.5),
        "random": dict(accuracy=0.25, precision=1.0, recall=1.0, f1=1.0, yes_ratio=0.375),
    },
    "vlmevalkit": {
        "all": dict(f1=0.9523809523809522, accuracy=0.7916666666666665, precision=1.0, recall=0.9090909090909091),
        "adversarial": dict(f1=1.0, accuracy=1.0, precision=1.0, recall=1.0),
        "popular": dict(f1=0.8571428571428571, accuracy=0.75, precision=1.0, recall=0.75),
        "random": dict(f1=1.0, accuracy=0.625, precision=1.0, recall=1.0),
    },
}
# VLMEvalKit, answers 2 and 10 replaced by null and 7
POPE_VLMEVALKIT_NON_STRING = dict(f1=0.9, accuracy=0.7083333333333335, precision=1.0, recall=0.8181818181818182)

MME_PEERS = {
    "llava": dict(perception=1400.0, cognition=500.0, subtasks=dict(
        existence=200.0, count=200.0, position=200.0, color=50.0, posters=50.0, celebrity=50.0, scene=200.0,
        landmark=50.0, artwork=200.0, OCR=200.0, commonsense_reasoning=200.0, numerical_calculation=50.0,
        text_translation=200.0, code_reasoning=50.0)),
    "lmms-eval": dict(perception=1550.0, cognition=500.0),
    "vlmevalkit": dict(perception=1350.0, cognition=300.0, subtasks=dict(
        existence=200.0, count=200.0, position=200.0, color=50.0, posters=200.0, celebrity=0.0, scene=200.0,
        landmark=50.0, artwork=50.0, OCR=200.0, commonsense_reasoning=0.0, numerical_calculation=50.0,
        text_translation=200.0, code_reasoning=50.0)),
}  # fmt: skip
# VLMEvalKit, answers 1 and 4 (existence, count) replaced by null and 7
MME_VLMEVALKIT_NON_STRING = dict(perception=1050.0, cognition=300.0)
# the conformance answers without those of the subtasks named: what each tool gives (its totals) or raises
MME_ABSENT_PEERS = {
    ("code_reasoning",): {
        "llava": "FileNotFoundError (code_reasoning.txt), after printing the perception scores",  # printed 1400
        "lmms-eval": dict(perception=1550.0, cognition=450.0),
        "vlmevalkit": "KeyError ('code_reasoning')",
    },
    ("existence", "text_translation"): {
        "llava": "FileNotFoundError (existence.txt)",
        "lmms-eval": dict(perception=1350.0, cognition=300.0),
        "vlmevalkit": "KeyError ('existence')",
    },
    ("OCR",): {
        "llava": "FileNotFoundError (OCR.txt)",
        "lmms-eval": dict(perception=1350.0, cognition=500.0),
        "vlmevalkit": "KeyError ('OCR')",
    },
}


def _metrics(split, names):
    return {name: getattr(split, name) for name in names}


@pytest.mark.parametrize("protocol", ["llava", "lmms-eval", "vlmevalkit"])
def test_pope_equals_the_peer(tmp_path, protocol):
    result = evaluate_pope(**write_pope(tmp_path), protocol=protocol)
    for split, expected in POPE_PEERS[protocol].items():
        ours = result.overall if split == "all" else result.splits[split]
        assert _metrics(ours, expected) == pytest.approx(expected, abs=1e-12), split
    if protocol == "llava":
        assert result.headline_f1 == pytest.approx(sum(s["f1"] for s in POPE_PEERS["llava"].values()) / 3)
    else:
        assert result.headline_f1 == pytest.approx(POPE_PEERS[protocol]["all"]["f1"])


@pytest.mark.parametrize("protocol", ["llava", "lmms-eval", "vlmevalkit"])
def test_mme_equals_the_peer(tmp_path, protocol):
    result = evaluate_mme(**write_mme(tmp_path), protocol=protocol)
    expected = MME_PEERS[protocol]
    assert (result.perception, result.cognition) == pytest.approx((expected["perception"], expected["cognition"]))
    for subtask, score in expected.get("subtasks", {}).items():
        assert result.subtasks[subtask].score == pytest.approx(score), subtask
    assert set(result.subtasks) == set(MME_SUBTASKS) and not result.tool_failures


def test_vlmevalkit_counts_non_string_answers_as_vlmevalkit_does(tmp_path):
    from conformance_sets import MME_ANSWERS, POPE_ANSWERS

    pope = {split: list(answers) for split, answers in POPE_ANSWERS.items()}
    pope["adversarial"][1] = (pope["adversarial"][1][0], None)
    pope["popular"][1] = (pope["popular"][1][0], 7)
    files = write_pope(tmp_path / "pope", pope)
    result = evaluate_pope(**files, protocol="vlmevalkit")
    assert _metrics(result.overall, POPE_VLMEVALKIT_NON_STRING) == pytest.approx(POPE_VLMEVALKIT_NON_STRING)
    assert result.num_malformed == 2 and result.overall.num_answered == 24 and not result.tool_failures
    for protocol in ("llava", "lmms-eval"):  # their tools raise: reported, the lines named
        other = evaluate_pope(**files, protocol=protocol)
        assert [f.split(" (")[0] for f in other.tool_failures] == [f"{files['result_file']}:{n}" for n in (2, 10)]
        assert other.overall.num_answered == 22

    mme = list(MME_ANSWERS)
    mme[0], mme[3] = (mme[0][0], None), (mme[3][0], 7)
    files = write_mme(tmp_path / "mme", mme)
    result = evaluate_mme(**files, protocol="vlmevalkit")
    assert (result.perception, result.cognition) == pytest.approx(tuple(MME_VLMEVALKIT_NON_STRING.values()))
    assert not result.tool_failures
    for protocol in ("llava", "lmms-eval"):
        assert len(evaluate_mme(**files, protocol=protocol).tool_failures) == 2


@pytest.mark.parametrize("text", ["Yes\nit is", "Yes\rit is", "Yes\tit is"])
def test_line_breaks_and_tabs_fail_only_llavas_mme_route(tmp_path, text):
    from conformance_sets import MME_ANSWERS

    mme = list(MME_ANSWERS)
    mme[2] = (mme[2][0], text)
    files = write_mme(tmp_path, mme)
    llava = evaluate_mme(**files, protocol="llava")
    (failure,) = llava.tool_failures
    assert failure.startswith(f"{files['result_file']}:3 ") and "calculation.py raises ValueError" in failure
    assert any("would not have scored this file" in warning for warning in llava.warnings)
    assert not evaluate_mme(**files, protocol="lmms-eval").tool_failures
    assert not evaluate_mme(**files, protocol="vlmevalkit").tool_failures


@pytest.mark.parametrize("absent", list(MME_ABSENT_PEERS))
@pytest.mark.parametrize("protocol", ["llava", "lmms-eval", "vlmevalkit"])
def test_absent_subtasks_as_the_peers_score_them(tmp_path, protocol, absent):
    files = write_mme(tmp_path)
    records = files["result_file"].read_text().splitlines()
    kept = [line for line in records if json.loads(line)["question_id"].split("/")[0] not in absent]
    files["result_file"].write_text("".join(line + "\n" for line in kept))
    result = evaluate_mme(**files, protocol=protocol)
    expected = MME_ABSENT_PEERS[absent][protocol]
    assert result.subtasks_without_answers == list(absent)
    assert any("without any answer (each adds 0" in w and "; ".join(absent) in w for w in result.warnings)
    if isinstance(expected, dict):  # the tool gives a number: the same one
        assert (result.perception, result.cognition) == pytest.approx((expected["perception"], expected["cognition"]))
        assert not result.tool_failures
        return
    (failure,) = result.tool_failures
    subtasks = "subtask" if len(absent) == 1 else "subtasks"
    assert failure.startswith(f"{files['result_file']}: no answers to MME {subtasks} {', '.join(absent)}: ")
    assert failure.endswith(f"raises {expected}")
    assert any("would not have scored this file" in warning for warning in result.warnings)
    # scored anyway, each absent subtask as 0 (for LLaVA's route the perception it printed before it raised)
    full = evaluate_mme(**write_mme(tmp_path / "full"), protocol=protocol)
    assert [result.subtasks[name].score for name in absent] == [0.0] * len(absent)
    lost = sum(full.subtasks[name].score for name in absent)
    assert result.perception + result.cognition == pytest.approx(full.perception + full.cognition - lost)
    if absent == ("code_reasoning",) and protocol == "llava":
        assert result.perception == 1400.0
