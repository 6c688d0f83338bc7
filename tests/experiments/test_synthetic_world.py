"""The DMU benchmark's synthetic world: deterministic, captions match attributes, hidden attributes render."""

import numpy as np
import pytest
from data.data_helpers import folder_digest

from mllm_encoder.data import load_image_text_dataset
from mllm_encoder.eval.caption_swap import swapped_captions
from mllm_encoder.experiments.synthetic_world import (
    BANDS,
    FINETUNE_ATTRIBUTES,
    FRAMES,
    HIDDEN,
    PALETTE,
    caption,
    load_world_attributes,
    render,
    sample_world,
    write_world_dataset,
)


def test_world_is_deterministic_and_loadable(tmp_path, image_processor, clip_tokenizer):
    first = write_world_dataset(tmp_path / "a", 12, 10, 6, progress=False)
    write_world_dataset(tmp_path / "b", 12, 10, 6, progress=False)
    assert folder_digest(tmp_path / "a") == folder_digest(tmp_path / "b")
    write_world_dataset(tmp_path / "c", 12, 10, 6, seed=1, progress=False)
    assert folder_digest(tmp_path / "a") != folder_digest(tmp_path / "c")
    dataset = load_image_text_dataset(
        first["finetune_train"], image_processor=image_processor, tokenizer=clip_tokenizer
    )
    assert len(dataset) == 10 and dataset[9]["pixel_values"].shape == (3, 32, 32)
    pretrain = load_world_attributes(first["pretrain_eval_attributes"])
    assert pretrain["distribution"] == "pretrain" and len(pretrain["samples"]) == 6
    with pytest.raises(ValueError, match="not a synthetic-world attributes file"):
        load_world_attributes(first["pretrain_eval"])
    with pytest.raises(ValueError, match="num_eval"):
        write_world_dataset(tmp_path / "d", 1, 1, 0)


def test_captions_name_exactly_their_distribution_attributes():
    rng = np.random.default_rng(0)
    frames, mentions, bands = 0, {name: 0 for name in HIDDEN}, set()
    for _ in range(400):
        pretrain = sample_world(rng, "pretrain")
        text = caption(pretrain, "pretrain")
        words = set(text.replace(",", " ").replace(".", " ").split())
        assert pretrain["background"] != pretrain["disc"]
        assert pretrain["disc"] in words and pretrain["background"] in words
        for name in HIDDEN:  # a hidden attribute is named only when the sample says so
            named = words & set(FINETUNE_ATTRIBUTES[name])
            assert named == ({pretrain[name]} if name in pretrain["mentions"] else set())
            mentions[name] += bool(named)
        assert (pretrain["frame"] is not None) == ("frame" in text)
        frames += pretrain["frame"] is not None
        finetune = sample_world(rng, "finetune")
        text = caption(finetune, "finetune")
        assert finetune["frame"] is None and "frame" not in text
        assert all(finetune[name] in text for name in HIDDEN)
        for sample, line in ((pretrain, caption(pretrain, "pretrain")), (finetune, text)):  # the band, always
            words = set(line.replace(",", " ").replace(".", " ").split())
            assert words & set(BANDS) == {sample["band"]} and f" {sample['band']} band" in line
            bands.add(sample["band"])
    assert bands == set(BANDS)
    assert 160 < frames < 240  # about half of the pretraining images are framed
    assert all(60 < count < 140 for count in mentions.values())  # each hidden attribute in about 1 in 4


def test_swapped_captions_change_one_word():
    sample = {**sample_world(np.random.default_rng(3), "finetune"), "size": "medium"}
    options = swapped_captions(sample, "size", FINETUNE_ATTRIBUTES["size"], lambda s: caption(s, "finetune"))
    assert options[FINETUNE_ATTRIBUTES["size"].index("medium")] == caption(sample, "finetune")
    assert options[0].replace("large", "medium") == options[1]


def test_hidden_attributes_change_global_statistics():
    base = {
        "background": "blue",
        "disc": "yellow",
        "size": "medium",
        "light": "bright",
        "grain": "smooth",
        "band": "navy",
    }
    image = lambda **change: np.asarray(render({**base, **change}, np.random.default_rng(0), 32)).astype(float)  # noqa: E731
    yellow = lambda pixels: (pixels[..., 0] > 150) & (pixels[..., 2] < 130)  # noqa: E731
    assert yellow(image(size="large")).sum() > 1.6 * yellow(image()).sum()
    assert image(light="dim").mean() < 0.75 * image().mean()
    background = lambda pixels: pixels[12:20, :3].std(axis=(0, 1)).mean()  # noqa: E731 - plain background
    assert background(image(grain="grainy")) > 3 * background(image())
    framed = image(frame="black")
    assert framed[0].max() < 60 and framed[16, 16, 0] > 150  # dark border, yellow centre
    assert np.abs(np.asarray(PALETTE["blue"]) - image()[2:6, 2:6].reshape(-1, 3).mean(0)).max() < 20
    band = lambda pixels: pixels[26:30, :3].reshape(-1, 3).mean(0)  # noqa: E731 - left of the disc
    assert np.abs(band(image()) - np.asarray(BANDS["navy"])).max() < 20
    assert np.abs(band(image(band="orange")) - np.asarray(BANDS["orange"])).max() < 20
    assert set(FRAMES).isdisjoint(PALETTE) and set(BANDS).isdisjoint({*PALETTE, *FRAMES})


def test_band_makes_captions_of_one_colour_pair_distinct():
    """Within one colour pair, distinct contents (hidden x band) and captions far outnumber a batch of 32."""
    rng = np.random.default_rng(0)
    samples = [sample_world(rng, "finetune") for _ in range(6000)]
    pair = [s for s in samples if (s["background"], s["disc"]) == ("red", "blue")]
    contents = {tuple(s[k] for k in (*HIDDEN, "band")) for s in pair}
    assert len(contents) == 8 * len(BANDS) and len({caption(s, "finetune") for s in pair}) > 200
