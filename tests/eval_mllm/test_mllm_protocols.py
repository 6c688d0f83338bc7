"""How LLaVA, lmms-eval and VLMEvalKit read a free-form answer as yes / no / other (hand-written tables)."""

import pytest

from mllm_encoder.eval.mllm.protocols import (
    MME_PARSERS,
    POPE_PARSERS,
    BinaryCounts,
    check_protocol,
    lmms_eval_mme_parse,
    pope_metrics,
    vlmevalkit_parse,
)

# answer: (LLaVA eval_pope, lmms-eval POPE, VLMEvalKit)
POPE_CASES = {
    "Yes": ("yes", "yes", "yes"),
    " yes \n": ("yes", "yes", "yes"),
    "No": ("no", "no", "no"),
    "No.": ("no", "other", "no"),
    "NO": ("yes", "no", "no"),
    "Yes, there is a dog.": ("yes", "other", "yes"),
    "There is no dog.": ("no", "other", "no"),
    "not sure": ("no", "other", "other"),
    "Yes. No dog though.": ("yes", "other", "other"),
    "": ("yes", "other", "other"),
}

# answer: (MME calculation.py, lmms-eval parse_pred_ans, VLMEvalKit)
MME_CASES = {
    "Yes": ("yes", "yes", "yes"),
    "no.": ("no", "no", "no"),
    "y": ("other", "yes", "other"),
    "N.": ("other", "no", "other"),
    "None": ("no", "no", "other"),
    "Not at all": ("no", "no", "other"),
    "I think yes": ("other", "other", "yes"),
    "The answer is no.": ("other", "other", "no"),
    "noyes": ("no", "no", "other"),
    "  yes": ("other", "yes", "yes"),
    "": ("other", "other", "other"),
}


@pytest.mark.parametrize(
    "parsers, text, expected",
    [(POPE_PARSERS, text, expected) for text, expected in POPE_CASES.items()]
    + [(MME_PARSERS, text, expected) for text, expected in MME_CASES.items()],
)
def test_parsers(parsers, text, expected):
    assert tuple(parsers[p](text) for p in ("llava", "lmms-eval", "vlmevalkit")) == expected


def test_vlmevalkit_punctuation_rules():
    # a mark touching a space is deleted everywhere, else replaced by a space; '.' before a digit stays
    assert vlmevalkit_parse("yes/no") == "other"  # "yes no"
    assert vlmevalkit_parse("yes.no") == "other"  # "yesno"
    assert vlmevalkit_parse("No-one is there") == "no"  # "no one is there"
    assert vlmevalkit_parse("Yes (definitely)") == "yes"
    assert vlmevalkit_parse("yes!no") == "other"  # "yes no"
    assert vlmevalkit_parse("Yes, 1,000 dogs; no cats") == "other" and vlmevalkit_parse("Yes, 1,000") == "yes"
    assert lmms_eval_mme_parse("Y.") == "yes"


def test_pope_metric_definitions_differ_only_where_documented():
    counts = BinaryCounts.count(["yes", "other", "no", "other", "yes"], ["yes", "yes", "no", "no", "no"])
    assert (counts.tp, counts.fp, counts.tn, counts.fn, counts.other_yes, counts.other_no) == (1, 1, 1, 0, 1, 1)
    lmms, vlmeval = pope_metrics(counts, "lmms-eval"), pope_metrics(counts, "vlmevalkit")
    assert (lmms["accuracy"], lmms["precision"], lmms["recall"], lmms["yes_ratio"]) == (0.4, 0.5, 1.0, 0.4)
    assert (vlmeval["accuracy"], vlmeval["precision"], vlmeval["recall"], vlmeval["yes_ratio"]) == (0.4, 0.5, 0.5, None)
    empty = pope_metrics(BinaryCounts(), "llava")
    assert empty == {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
    with pytest.raises(ValueError, match="unknown protocol 'vlmeval'; expected one of llava, lmms-eval, vlmevalkit"):
        check_protocol("vlmeval")
