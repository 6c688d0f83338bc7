"""Same config and seed on the same machine: bit-identical stages and ``results.json``."""

import json

from safetensors.numpy import load_file

from mllm_encoder.dmu.accelerator import build_accelerator
from mllm_encoder.dmu.config import config_from_dict
from mllm_encoder.dmu.pipeline import run_pipeline


def _config(run_dir, base, data):
    stage = dict(steps=3, batch_size=4, warmup_steps=1, lr=1e-3)
    return config_from_dict(
        {
            "base_model": str(base),
            "run_dir": str(run_dir),
            "data": {"train": data["train"]},
            "eval": {"data": data["eval"], "attributes": data["eval_attributes"], "batch_size": 8},
            "dmu": {"num_experts": 3, "top_k": 2, "extract_batch_size": 16, "kmeans_backend": "auto"},
            "mcl": stage,
            "route": {**stage, "steps": 2},
            "runtime": {"save_every": 2, "log_every": 1, "mixed_precision": "no"},
        }
    )


def test_two_runs_are_bit_identical(tmp_path, tiny_base_dir, shapes_data):
    accelerator = build_accelerator("no")
    runs = [tmp_path / "a", tmp_path / "b"]
    for run_dir in runs:
        run_pipeline(_config(run_dir, tiny_base_dir, shapes_data), "dmu", accelerator)
    a, b = (json.loads((run / "results.json").read_text()) for run in runs)
    assert a == b and a["dmu"]
    for stage in ("dmu/cluster_0", "dmu/cluster_1"):
        assert (runs[0] / stage / "labels.npy").read_bytes() == (runs[1] / stage / "labels.npy").read_bytes()
    for stage in ("dmu/mcl_1", "dmu/mcl_2", "dmu/route"):
        weights = [load_file(str(run / stage / "model" / "model.safetensors")) for run in runs]
        assert all((weights[0][name] == weights[1][name]).all() for name in weights[0]), stage
