"""The benchmark's statistics and computed verdict: sample std, the significance rule, sentences from numbers."""

import pytest

from mllm_encoder.experiments.report import METRICS, aggregate_results, compare, seed_statistics


def test_seed_statistics_and_significance_rule():
    stats = seed_statistics([{"m": 1.0}, {"m": 2.0}, {"m": 3.0}])["m"]
    assert stats == {"mean": 2.0, "std": 1.0, "per_seed": [1.0, 2.0, 3.0]}
    a, b = {"mean": 10.0, "std": 1.0}, {"mean": 7.5, "std": 1.0}
    assert compare(a, b, 3) == "significant gain" and compare(b, a, 3) == "significant loss"
    assert compare({"mean": 9.0, "std": 1.0}, b, 3) == "within the seed spread"  # 1.5 <= 2.0
    assert compare(a, b, 1) == "one seed, no significance claimed"


def _metrics(value: float, **overrides: float):
    return {**{metric: value for metric in METRICS}, **overrides}


def test_verdict_is_computed_from_the_numbers():
    seeds = [0, 1, 2]
    per_seed = {}
    for seed in seeds:
        jitter = 0.1 * seed
        per_seed[seed] = {
            "base": _metrics(50.0),
            "finetune": _metrics(60.0 + jitter, retain_i2t_r1=40.0 + jitter),
            "upcycle": _metrics(61.0 + jitter, retain_i2t_r1=42.0 + jitter),
            "dmu": _metrics(58.0 + jitter, retain_i2t_r1=49.0 + jitter),
            "expert_1": _metrics(57.0 + jitter, swap_size=70.0 + jitter),
            "expert_2": _metrics(56.0 + jitter),
            "control_random": _metrics(57.0 + jitter, swap_size=60.0 + jitter),
        }
    results = aggregate_results(seeds, per_seed, num_experts=3)
    assert list(results) == ["seeds", "methods", "experts", "control", "verdict"]
    assert list(results["methods"]) == ["base", "finetune", "upcycle", "dmu"]
    assert list(results["experts"]) == ["expert_0", "expert_1", "expert_2"]
    assert results["control"]["cluster"] == results["experts"]["expert_1"]
    assert results["methods"]["dmu"]["retain_i2t_r1"]["per_seed"] == pytest.approx([49.0, 49.1, 49.2])
    verdict = "\n".join(results["verdict"])
    assert (
        "Control, swap_size: one-cluster batches 70.1 ± 0.1 vs random batches 60.1 ± 0.1 (+10.0 points, "
        "significant gain)" in verdict
    )
    assert (
        "Control, swap_light: one-cluster batches 57.1 ± 0.1 vs random batches 57.1 ± 0.1 (+0.0 points, "
        "within the seed spread)" in verdict
    )
    assert (
        "DMU vs the best baseline on retain_i2t_r1 (upcycle): 49.1 ± 0.1 vs 42.1 ± 0.1 (+7.0 points, "
        "significant gain)" in verdict
    )
    assert (
        "significantly beats both baselines on retain_i2t_r1; loses to the best on swap_hidden, "
        "probe_hidden, i2t_r1, t2i_r1, retain_t2i_r1, retain_swap_frame" in verdict
    )
    assert (
        "Retention, retain_i2t_r1 (base 50.0): change after training: finetune -9.9, upcycle -7.9, dmu -0.9." in verdict
    )
