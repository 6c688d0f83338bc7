"""Smoke test of scripts/bench_moe.py: every section of its CPU mode runs on tiny shapes and prints its table."""

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_moe.py"


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
    tables = _tables(out)
    assert list(tables) == [f"bfloat16: {title}" for title in ("layer", "tower, inference, eager")] + [
        "bfloat16: tower, training step (fp32 weights, bfloat16 autocast)",
        "bfloat16: tower, inference, compile_tower (backend eager)",
    ]
    for row in tables["bfloat16: layer"]:  # every backend measured; the ratio is of the printed times
        assert float(row["MoE ms"]) > 0 and float(row["floor ms"]) > 0
        moe, floor = float(row["MoE ms"]), float(row["floor ms"])
        assert _within_rounding(float(row["MoE / floor"]), moe, floor, 0.005)  # ms printed to 0.01
    assert [row["backend"] for row in tables["bfloat16: layer"]] == ["auto (= grouped)", "grouped", "loop"]
    flops = bench.flop_ratio(bench.vision_config("tiny", 4, 2))
    for title, rows in tables.items():
        if title == "bfloat16: layer":
            continue
        dense = float(rows[0]["ms"])
        assert rows[0]["variant"].startswith("dense") and rows[0]["MoE / dense"] == ""
        for row in rows:
            ms, images = float(row["ms"]), 1000.0 * int(row["batch"])  # ms printed to 0.1, img/s to 0.1
            assert images / (ms + 0.05) - 0.051 <= float(row["img/s"]) <= images / (ms - 0.05) + 0.051
            if row is not rows[0]:
                assert _within_rounding(float(row["MoE / dense"]), ms, dense, 0.05)  # ms printed to 0.1
            if "FLOP ratio" in row:
                assert float(row["FLOP ratio"]) == pytest.approx(flops, abs=0.006)
    assert bench.flop_ratio(bench.vision_config("vit-l", 4, 2)) == pytest.approx(1.61, abs=0.01)


def _within_rounding(ratio: float, numerator: float, denominator: float, half_step: float) -> bool:
    """Whether ``ratio`` (printed to 0.01) can be the ratio of two times printed as ``numerator`` and
    ``denominator`` (each within ``half_step`` of the time measured)."""
    low = (numerator - half_step) / (denominator + half_step) - 0.0051
    high = (numerator + half_step) / (denominator - half_step) + 0.0051
    return low <= ratio <= high


def _tables(out: str):
    """``{title: [row as {column: cell}]}`` of every Markdown table the benchmark printed under a bold title."""
    tables, title, header = {}, None, None
    for line in out.splitlines():
        if line.startswith("**"):
            title, header = line.split(", ", 2)[-1].split("**")[0], None
        elif line.startswith("| ") and title is not None:
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
            else:
                tables.setdefault(title, []).append(dict(zip(header, cells)))
    return tables
