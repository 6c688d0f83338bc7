"""The demo benchmark's evaluator on a tiny world: every metric, trimmed padding changes nothing, deterministic."""

import torch

from mllm_encoder.dmu.resources import load_model
from mllm_encoder.encode import encode_texts
from mllm_encoder.experiments.evaluator import WorldEvaluator
from mllm_encoder.experiments.report import METRICS
from mllm_encoder.experiments.synthetic_world import write_world_dataset
from mllm_encoder.upcycle import sparse_upcycle


def test_world_evaluator_metrics(tmp_path, tiny_base_dir):
    paths = write_world_dataset(tmp_path, num_pretrain=8, num_finetune=24, num_eval=16, progress=False)
    evaluator = WorldEvaluator(paths, tiny_base_dir, probe_train=20)
    model = load_model(tiny_base_dir)
    metrics = evaluator.evaluate(model)
    assert set(metrics) == set(METRICS)
    assert all(0.0 <= value <= 100.0 for value in metrics.values())
    assert metrics["swap_hidden"] == sum(metrics[f"swap_{a}"] for a in ("size", "light", "grain")) / 3
    assert evaluator.evaluate(model) == metrics  # deterministic
    framed = [s for s in evaluator.data["pretrain_eval"]["samples"] if s["frame"]]
    assert len(evaluator.options["retain_swap_frame"].samples) == len(framed) > 0

    tokens = evaluator.option_tokens["swap_size"]  # padded to the context; trimmed per chunk inside
    full = encode_texts(model, evaluator.options["swap_size"].captions, evaluator.text_tokenizer, progress=False)
    assert tokens["input_ids"].shape[1] == 32 and tokens["attention_mask"].sum(1).max() < 32
    torch.testing.assert_close(evaluator._texts(model, tokens), full, atol=1e-5, rtol=1e-5)

    loads = evaluator.expert_load(sparse_upcycle(model, num_experts=2, top_k=1))
    assert set(loads) == {"finetune_eval", "pretrain_eval"}
    assert all(abs(sum(row) - 1.0) < 1e-6 for row in loads["finetune_eval"]["vision"]["load"])
