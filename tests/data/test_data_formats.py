"""Every on-disk format yields the same preprocessed samples with stable indices."""

import csv
import io
import json
import tarfile

import pytest
import torch
from data_helpers import CONTEXT_LENGTH, IMAGE_SIZE
from PIL import Image
from torch.utils.data import DataLoader

from mllm_encoder.data import (
    ClipImageTransform,
    ImageTextCollator,
    ImageTextDataset,
    WebDatasetImageText,
    detect_format,
    expand_shards,
    load_image_text_dataset,
)


def _load(path, image_processor, clip_tokenizer, **kwargs):
    return load_image_text_dataset(
        path,
        image_processor=image_processor,
        tokenizer=clip_tokenizer,
        context_length=CONTEXT_LENGTH,
        **kwargs,
    )


def _expected(root, captions, image_processor, clip_tokenizer, order=range(5)):
    transform = ClipImageTransform.from_processor(image_processor)
    pixels = torch.stack([transform(Image.open(root / f"img{i}.jpg")) for i in order])
    tokens = clip_tokenizer([captions[i] for i in order], padding="max_length", max_length=CONTEXT_LENGTH)
    return pixels, torch.tensor(tokens["input_ids"]), torch.tensor(tokens["attention_mask"])


def _check(dataset, root, captions, image_processor, clip_tokenizer):
    batch = ImageTextCollator()([dataset[i] for i in range(len(dataset))])
    pixels, input_ids, attention_mask = _expected(root, captions, image_processor, clip_tokenizer)
    assert batch["index"].tolist() == list(range(5))
    assert batch["pixel_values"].shape == (5, 3, IMAGE_SIZE, IMAGE_SIZE)
    torch.testing.assert_close(batch["pixel_values"], pixels)
    assert torch.equal(batch["input_ids"], input_ids)
    assert torch.equal(batch["attention_mask"], attention_mask)


def _sharegpt4v(root, captions, relative=True):
    records = []
    for i, caption in enumerate(captions):
        image = f"img{i}.jpg" if relative else str(root / f"img{i}.jpg")
        turns = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": caption}]
        records.append({"id": str(i), "image": image, "conversations": turns})
    return records


def test_sharegpt4v_json(image_files, image_processor, clip_tokenizer):
    root, captions = image_files
    records = _sharegpt4v(root, captions)
    records.insert(2, {"id": "text-only", "conversations": [{"value": "hi"}, {"value": "hello"}]})
    (root / "data.json").write_text(json.dumps(records))
    dataset = _load(root / "data.json", image_processor, clip_tokenizer)
    assert isinstance(dataset, ImageTextDataset) and len(dataset) == 5
    assert dataset.records[2].source.endswith("data.json: record 3")
    _check(dataset, root, captions, image_processor, clip_tokenizer)


def test_sharegpt4v_jsonl_with_image_root(image_files, image_processor, clip_tokenizer, tmp_path_factory):
    root, captions = image_files
    elsewhere = tmp_path_factory.mktemp("json")
    lines = "\n".join(json.dumps(r) for r in _sharegpt4v(root, captions))
    (elsewhere / "data.jsonl").write_text(lines + "\n")
    dataset = _load(elsewhere / "data.jsonl", image_processor, clip_tokenizer, image_root=root)
    _check(dataset, root, captions, image_processor, clip_tokenizer)


def test_img2dataset_folder_nested_shards(image_files, image_processor, clip_tokenizer, tmp_path_factory):
    root, captions = image_files
    folder = tmp_path_factory.mktemp("files")
    for i, caption in enumerate(captions):
        shard = folder / f"{i // 3:05d}"
        shard.mkdir(exist_ok=True)
        (shard / f"img{i}.jpg").write_bytes((root / f"img{i}.jpg").read_bytes())
        (shard / f"img{i}.txt").write_text(caption + "\n")
    assert detect_format(folder) == "folder"
    dataset = _load(folder, image_processor, clip_tokenizer)
    assert [r.caption for r in dataset.records] == captions
    _check(dataset, root, captions, image_processor, clip_tokenizer)


@pytest.mark.parametrize("delimiter,suffix", [(",", "csv"), ("\t", "tsv")])
def test_csv_and_tsv(image_files, image_processor, clip_tokenizer, delimiter, suffix):
    root, captions = image_files
    with open(root / f"pairs.{suffix}", "w", newline="") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(["filepath", "title", "other"])
        writer.writerows([f"img{i}.jpg", caption, "x"] for i, caption in enumerate(captions))
    dataset = _load(root / f"pairs.{suffix}", image_processor, clip_tokenizer)
    assert dataset.records[0].source.endswith(f"pairs.{suffix}: line 2")
    _check(dataset, root, captions, image_processor, clip_tokenizer)
    named = _load(
        root / f"pairs.{suffix}",
        image_processor,
        clip_tokenizer,
        image_column="filepath",
        caption_column="title",
    )
    assert named.captions == captions
    with pytest.raises(ValueError, match="no caption column 'missing'"):
        _load(root / f"pairs.{suffix}", image_processor, clip_tokenizer, caption_column="missing")


def _write_shards(root, captions, out_dir):
    paths = []
    for shard in range(2):
        path = out_dir / f"shard-{shard:03d}.tar"
        with tarfile.open(path, "w") as archive:
            for i in range(shard * 3, min(shard * 3 + 3, len(captions))):
                for name, data in (
                    (f"{i:06d}.jpg", (root / f"img{i}.jpg").read_bytes()),
                    (f"{i:06d}.txt", captions[i].encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def test_expand_shards_patterns(tmp_path):
    for name in ("s-08.tar", "s-09.tar", "s-10.tar", "b.tar", "a.tar", "x-1.tar"):
        (tmp_path / name).write_bytes(b"")
    assert expand_shards(f"{tmp_path}/s-{{08..10}}.tar") == [str(tmp_path / f"s-{n}.tar") for n in ("08", "09", "10")]
    assert expand_shards(f"{tmp_path}/{{a,b}}.tar") == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    assert expand_shards(f"{tmp_path}/[ab].tar::{tmp_path}/x-{{1..1}}.tar::pipe:cat y.tar") == [
        str(tmp_path / "a.tar"),
        str(tmp_path / "b.tar"),
        str(tmp_path / "x-1.tar"),
        "pipe:cat y.tar",
    ]
    with pytest.raises(ValueError, match="no webdataset shards"):
        expand_shards(f"{tmp_path}/*.none")
    with pytest.raises(ValueError, match="shards not found: .*s-11.tar"):
        expand_shards(f"{tmp_path}/s-{{10..11}}.tar")


def test_webdataset_streaming(image_files, image_processor, clip_tokenizer, tmp_path_factory):
    root, captions = image_files
    out_dir = tmp_path_factory.mktemp("wds")
    _write_shards(root, captions, out_dir)
    pattern = str(out_dir / "shard-{000..001}.tar")
    assert expand_shards(pattern) == [str(out_dir / "shard-000.tar"), str(out_dir / "shard-001.tar")]
    dataset = _load(pattern, image_processor, clip_tokenizer, shard_stride=1000)
    assert isinstance(dataset, WebDatasetImageText)
    samples = list(dataset)
    assert [s["index"] for s in samples] == [0, 1, 2, 1000, 1001]
    assert dataset.split_index(1001) == (str(out_dir / "shard-001.tar"), 1)
    pixels, input_ids, _ = _expected(root, captions, image_processor, clip_tokenizer)
    torch.testing.assert_close(torch.stack([s["pixel_values"] for s in samples]), pixels)
    assert torch.equal(torch.stack([s["input_ids"] for s in samples]), input_ids)


def test_webdataset_split_over_ranks_and_workers(image_files, image_processor, clip_tokenizer, tmp_path_factory):
    root, captions = image_files
    out_dir = tmp_path_factory.mktemp("wds")
    shards = [str(p) for p in _write_shards(root, captions, out_dir)]
    seen = []
    for rank in range(2):
        dataset = _load(shards, image_processor, clip_tokenizer, format="webdataset", rank=rank, world_size=2)
        loader = DataLoader(dataset, batch_size=2, collate_fn=ImageTextCollator())
        seen.append(sorted(i for batch in loader for i in batch["index"].tolist()))
    assert seen == [[0, 1, 2], [1_000_000, 1_000_001]]
    loader = DataLoader(
        _load(shards, image_processor, clip_tokenizer, format="webdataset"),
        batch_size=2,
        num_workers=2,
        collate_fn=ImageTextCollator(),
    )
    assert sorted(i for batch in loader for i in batch["index"].tolist()) == [0, 1, 2, 1_000_000, 1_000_001]


def test_dataloader_with_workers(image_files, image_processor, clip_tokenizer):
    root, captions = image_files
    (root / "data.json").write_text(json.dumps(_sharegpt4v(root, captions)))
    dataset = _load(root / "data.json", image_processor, clip_tokenizer)
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=ImageTextCollator(dataset=dataset))
    assert [i for batch in loader for i in batch["index"].tolist()] == list(range(5))


def test_unknown_format_and_missing_processors(image_files, image_processor, clip_tokenizer):
    root, _ = image_files
    with pytest.raises(ValueError, match="cannot detect"):
        _load(root / "data.parquet", image_processor, clip_tokenizer)
    with pytest.raises(ValueError, match="unknown dataset format"):
        _load(root, image_processor, clip_tokenizer, format="parquet")
    with pytest.raises(ValueError, match="image_processor and tokenizer"):
        load_image_text_dataset(root, tokenizer=clip_tokenizer)
