"""The one evaluator of the synthetic worlds on a tiny world: known answers, a manual computation, trimmed padding
changes nothing, deterministic, and both worlds' metric sets."""

import functools

import pytest
import torch

from mllm_encoder.dmu.resources import load_model
from mllm_encoder.encode import encode_images, encode_texts
from mllm_encoder.eval.caption_swap import swapped_captions
from mllm_encoder.eval.linear_probe import linear_probe_accuracy
from mllm_encoder.experiments.control_world import METRICS as MARKER_METRICS
from mllm_encoder.experiments.evaluator import demo_world_evaluator, marker_world_evaluator
from mllm_encoder.experiments.marker_world import write_marker_world
from mllm_encoder.experiments.report import METRICS
from mllm_encoder.experiments.synthetic_world import FINETUNE_ATTRIBUTES, caption, write_world_dataset
from mllm_encoder.upcycle import sparse_upcycle


class ConstantText(torch.nn.Module):
    """The model with every caption mapped to one embedding: every swap option ties."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def get_image_features(self, **inputs):
        return self.model.get_image_features(**inputs)

    def get_text_features(self, input_ids, attention_mask):
        return torch.ones(len(input_ids), self.model.config.projection_dim)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_base_dir):
    paths = write_world_dataset(tmp_path_factory.mktemp("world"), 8, 24, 16, progress=False)
    return demo_world_evaluator(paths, tiny_base_dir, probe_train=20)


def test_world_evaluator_known_answers_and_a_manual_computation(world, tiny_base_dir):
    model = load_model(tiny_base_dir)
    metrics = world.evaluate(model)
    assert list(metrics) == [
        *("i2t_r1", "t2i_r1", "retain_i2t_r1", "retain_t2i_r1"),
        *("swap_size", "swap_light", "swap_grain", "retain_swap_frame", "swap_hidden"),
        *("probe_size", "probe_light", "probe_grain", "probe_hidden"),
    ]
    assert set(metrics) == set(METRICS)
    assert metrics["swap_hidden"] == sum(metrics[f"swap_{a}"] for a in ("size", "light", "grain")) / 3
    assert world.evaluate(model) == metrics  # deterministic

    # by hand: images and every caption option embedded one by one, the true caption strictly above the others
    samples = world.samples["finetune_eval"]
    images = encode_images(model, [{"pixel_values": world.pixels["finetune_eval"]}], progress=False)
    finetune = functools.partial(caption, distribution="finetune")
    sizes = FINETUNE_ATTRIBUTES["size"]
    hits = 0
    for row, sample in enumerate(samples):
        options = swapped_captions(sample, "size", sizes, finetune)
        assert options[sizes.index(sample["size"])] == sample["caption"]
        scores = encode_texts(model, options, world.text_tokenizer, progress=False) @ images[row]
        truth = sizes.index(sample["size"])
        hits += bool(scores[truth] > max(s for i, s in enumerate(scores) if i != truth))
    assert metrics["swap_size"] == pytest.approx(100.0 * hits / len(samples))
    train = encode_images(model, [{"pixel_values": world.pixels["finetune_train"]}], progress=False)
    labels = {split: torch.tensor([sizes.index(s["size"]) for s in world.samples[split]]) for split in world.samples}
    probe = linear_probe_accuracy(train, labels["finetune_train"], images, labels["finetune_eval"], num_classes=2)
    assert metrics["probe_size"] == pytest.approx(probe)

    # one embedding for every caption: every swap ties (a miss), every caption is every image's first (I2T 100),
    # and each caption finds its image first only for the one image closest to that embedding (T2I 100 / N)
    constant = world.evaluate(ConstantText(model))
    assert all(constant[name] == 0.0 for name in ("swap_size", "swap_light", "swap_grain", "retain_swap_frame"))
    assert constant["i2t_r1"] == constant["retain_i2t_r1"] == 100.0
    assert constant["t2i_r1"] == pytest.approx(100.0 / 16) and constant["retain_t2i_r1"] == pytest.approx(100.0 / 16)
    assert {k: constant[k] for k in constant if k.startswith("probe_")} == {
        k: metrics[k] for k in metrics if k.startswith("probe_")
    }


def test_trimmed_padding_changes_nothing_and_expert_load(world, tiny_base_dir):
    model = load_model(tiny_base_dir)
    framed = [s for s in world.samples["pretrain_eval"] if s["frame"]]
    assert len(world.options["retain_swap_frame"].samples) == len(framed) > 0
    tokens = world.options["swap_size"].tokens  # padded to the context; trimmed per chunk inside
    full = encode_texts(model, world.options["swap_size"].captions, world.text_tokenizer, progress=False)
    assert tokens["input_ids"].shape[1] == 32 and tokens["attention_mask"].sum(1).max() < 32
    torch.testing.assert_close(world._texts(model, tokens), full, atol=1e-5, rtol=1e-5)

    loads = world.expert_load(sparse_upcycle(model, num_experts=2, top_k=1))
    assert set(loads) == {"finetune_eval", "pretrain_eval"}
    assert all(abs(sum(row) - 1.0) < 1e-6 for row in loads["finetune_eval"]["vision"]["load"])


def test_marker_world_uses_the_same_evaluator(tmp_path, tiny_base_dir):
    paths = write_marker_world(tmp_path, num_train=12, num_eval=8, image_size=32, seed=0)
    evaluator = marker_world_evaluator(paths, tiny_base_dir, probe_train=10)
    metrics = evaluator.evaluate(ConstantText(load_model(tiny_base_dir)))
    assert set(metrics) == set(MARKER_METRICS)
    assert metrics["swap_size"] == 0.0 and metrics["i2t_r1"] == 100.0 and metrics["t2i_r1"] == pytest.approx(12.5)
    assert len(evaluator.pixels["train"]) == 10
