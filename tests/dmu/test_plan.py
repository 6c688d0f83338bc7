"""``clip-moe dmu plan``: the paper config on a synthetic index and a config-only ViT-L/14-336 base."""

import json

import pytest
import yaml
from transformers import CLIPConfig

from mllm_encoder.cli import main
from mllm_encoder.data import build_record_index
from mllm_encoder.dmu.config import DATA_INDEX, config_from_dict, load_config
from mllm_encoder.dmu.plan import count_samples, plan_run

PAPER = "configs/paper_vitl14_336_sharegpt4v.yaml"


@pytest.fixture(scope="module")
def paper_config(tmp_path_factory):
    """The paper config with its base replaced by a config-only ViT-L/14-336 and its data by 80,000 synthetic
    ShareGPT4V records (image files absent: the plan reads the index only)."""
    root = tmp_path_factory.mktemp("paper")
    base = root / "clip-vit-large-patch14-336"
    text = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12)
    vision = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24)
    vision.update(image_size=336, patch_size=14)
    CLIPConfig(text_config=text, vision_config=vision, projection_dim=768).save_pretrained(base)
    records = [
        {"image": f"sam/{i:06d}.jpg", "conversations": [{"value": "<image>"}, {"value": f"a long caption {i}"}]}
        for i in range(80_000)
    ]
    (root / "sharegpt4v.json").write_text(json.dumps(records))
    values = yaml.safe_load(open(PAPER).read())
    values.update(base_model=str(base), run_dir=str(root / "run"))
    values["data"].update(train=str(root / "sharegpt4v.json"), image_root=str(root))
    path = root / "paper.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_plan_of_the_paper_config_prints_every_stage(paper_config, capsys):
    main(["dmu", "plan", str(paper_config), "--world-size", "1"])
    out = capsys.readouterr().out
    assert "80,000 training samples; base 428.1M parameters, MoE 1202.6M" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("dmu/")}
    assert list(lines) == ["dmu/mcl_1", "dmu/mcl_2", "dmu/mcl_3", "dmu/route"]
    # stage 3: 729 equal clusters of 109 or 110 samples, one batch of 100 each, the rest dropped; epochs: 1 is one
    # pass of those 729 batches (the run's steps, counted over the stage's labels)
    assert lines["dmu/mcl_3"][1:4] == ["80,000", "729/0*", "729"]
    assert lines["dmu/mcl_3"][5] == "7,100" and lines["dmu/route"][2] == "1/0"
    assert "disk: features" in out and "host RAM per process" in out and "assumed equal in size" in out
    assert not (paper_config.parent / "run").exists()  # a dry run writes nothing


def test_plan_counts_steps_and_memory_as_the_run_does(paper_config):
    plan = plan_run(load_config(paper_config), "dmu", world_size=1)
    assert plan.dense_params == 427_944_193 + (248 - 77) * 768  # the text context stretched to 248
    mcl_1 = plan.stages[0]
    assert (mcl_1.samples, mcl_1.clusters_used, mcl_1.clusters_skipped) == (80_000, 9, 0)
    assert mcl_1.steps == 9 * 88 and mcl_1.samples_dropped == 80_000 - 9 * 88 * 100  # 88 batches per cluster
    assert mcl_1.passes == 1.0
    ffn = 24 * 2 * 1024 * 4096 + 24 * (4096 + 1024) + 12 * 2 * 768 * 3072 + 12 * (3072 + 768)
    assert mcl_1.trainable_params == ffn


def test_plan_refuses_a_config_no_cluster_can_feed(paper_config, capsys):
    with pytest.raises(SystemExit):
        main(["dmu", "plan", str(paper_config), "--world-size", "8"])
    error = capsys.readouterr().err.strip()
    assert error == (
        f"clip-moe dmu plan: error: {paper_config}: mcl.batch_size: a global batch of 100 x 8 processes is larger "
        "than any of the 729 clusters (assumed equal in size) of 80000 samples (largest: 110); lower mcl.batch_size "
        "or the clusters (dmu.image_clusters, dmu.text_clusters)"
    )


def test_plan_reads_a_runs_index_and_never_rewrites_it(tmp_path, monkeypatch):
    """The run's saved index is read when it matches the data; when the data changed since, the plan counts a
    scratch index and leaves the run's (which the run itself rebuilds, under its lock) untouched."""
    records = [{"image": f"{i}.jpg", "conversations": [{"value": "<image>"}, {"value": f"c {i}"}]} for i in range(30)]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(records))
    config = config_from_dict({"base_model": "m", "run_dir": str(tmp_path / "run"), "data": {"train": str(data)}})
    index_dir = tmp_path / "run" / DATA_INDEX / "records"
    build_record_index(data, index_dir=index_dir)
    saved = {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in index_dir.iterdir()}
    with monkeypatch.context() as patched:
        patched.setattr("mllm_encoder.dmu.plan.build_record_index", None)  # the saved index is read, not rebuilt
        assert count_samples(config) == 30
    data.write_text(json.dumps(records + records[:5]))
    assert count_samples(config) == 35
    assert {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in index_dir.iterdir()} == saved
