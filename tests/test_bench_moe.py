"""Smoke test of scripts/bench_moe.py: every section of its CPU mode runs on tiny shapes and prints its table."""

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_moe.py"


@pytest.fixture
def bench():
    spec = importlib.util.spec_from_file_location("bench_moe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch._dynamo.reset()
    yield module
    torch._dynamo.reset()


def test_cpu_mode_prints_every_table_without_failures(bench, capsys):
    bench.main(
        "--devices cpu --size tiny --dtypes bfloat16 --batches 1 --layer-images 1 --train-batch 1 --repeats 1 "
        "--warmup 0 --compile-batches 1 --compile-backend eager --sections layer tower train compile".split()
    )
    out = capsys.readouterr().out
    for title in (
        "layer",
        "tower, inference, eager",
        "tower, training step",
        "tower, inference, compile_tower (backend eager)",
    ):
        assert f"bfloat16: {title}" in out
    for row in ("| auto (= grouped) |", "| MoE loop |", "| Mixtral-style loop |", "| MoE auto (= grouped), compiled |"):
        assert row in out
    assert "failed:" not in out
    assert bench.flop_ratio(bench.vision_config("vit-l", 4, 2)) == pytest.approx(1.61, abs=0.01)
