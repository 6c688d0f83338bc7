"""Tar shards: streaming (split over ranks and workers, shuffled, resampled, ``pipe:``) and random access,
with every bad or lost sample counted and named."""

import gzip
import io
import json
import pickle
import tarfile

import numpy as np
import pytest
import torch
from data_helpers import CONTEXT_LENGTH, random_image, tar_bytes
from torch.utils.data import DataLoader

from mllm_encoder.data import (
    BadSampleFractionError,
    ImageTextCollator,
    TarShardDataset,
    WebDatasetImageText,
    load_image_text_dataset,
)

SAMPLES_PER_SHARD = 3


def _jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    random_image(np.random.default_rng(seed), 12, 10).save(buffer, format="JPEG")
    return buffer.getvalue()


def _sample_members(keys):
    return [member for key in keys for member in ((f"{key}.jpg", _jpeg(key)), (f"{key}.txt", f"photo {key}".encode()))]


@pytest.fixture
def shard_dir(tmp_path):
    """Five shards of three good samples each (keys 0..14), with a ``sizes.json``."""
    for shard in range(5):
        keys = range(shard * SAMPLES_PER_SHARD, (shard + 1) * SAMPLES_PER_SHARD)
        (tmp_path / f"shard-{shard:03d}.tar").write_bytes(tar_bytes(_sample_members(keys)))
    sizes = {f"shard-{shard:03d}.tar": SAMPLES_PER_SHARD for shard in range(5)}
    (tmp_path / "sizes.json").write_text(json.dumps(sizes))
    return tmp_path


def _load(shards, image_processor, clip_tokenizer, **kwargs):
    return load_image_text_dataset(
        shards,
        format="webdataset",
        image_processor=image_processor,
        tokenizer=clip_tokenizer,
        context_length=CONTEXT_LENGTH,
        **kwargs,
    )


def _indices(dataset, num_workers=0):
    loader = DataLoader(dataset, batch_size=2, num_workers=num_workers, collate_fn=ImageTextCollator())
    return [i for batch in loader if batch is not None for i in batch["index"].tolist()]


def _all_indices(shards=5):
    return [shard * 1_000_000 + position for shard in range(shards) for position in range(SAMPLES_PER_SHARD)]


@pytest.mark.parametrize("shuffle", [False, True])
def test_two_ranks_two_workers_read_every_sample_once(shard_dir, image_processor, clip_tokenizer, shuffle):
    pattern = str(shard_dir / "shard-{000..004}.tar")
    per_rank = []
    for rank in range(2):
        dataset = _load(pattern, image_processor, clip_tokenizer, rank=rank, world_size=2, shuffle_shards=shuffle)
        per_rank.append(_indices(dataset, num_workers=2))
    seen = per_rank[0] + per_rank[1]
    assert sorted(seen) == _all_indices() and len(set(seen)) == len(seen)
    shards_of = [{index // 1_000_000 for index in indices} for indices in per_rank]
    assert sorted(map(len, shards_of)) == [2, 3] and not shards_of[0] & shards_of[1]


def test_two_ranks_two_workers_count_and_name_bad_samples(shard_dir, image_processor, clip_tokenizer):
    members = _sample_members(range(6, 9))
    members[2] = ("7.jpg", b"not a jpeg")
    (shard_dir / "shard-002.tar").write_bytes(tar_bytes(members))
    pattern = str(shard_dir / "shard-{000..004}.tar")
    good, bad = [], 0
    for rank in range(2):
        dataset = _load(pattern, image_processor, clip_tokenizer, rank=rank, world_size=2)
        for sample in DataLoader(dataset, batch_size=None, num_workers=2):
            if sample is None:
                bad += 1
            else:
                good.append(int(sample["index"]))
    assert bad == 1 and sorted(good) == sorted(set(_all_indices()) - {2_000_001})
    # the worker that meets it (rank 0 reads shards 0, 2, 4 without shuffling) stops the run naming it
    dataset = _load(pattern, image_processor, clip_tokenizer, rank=0, world_size=2)
    collator = ImageTextCollator(max_bad_fraction=0.0, min_samples=1, dataset=dataset)
    with pytest.raises(BadSampleFractionError, match=r"shard-002.tar: 7: cannot decode image"):
        list(DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collator))


def test_shuffled_shard_order_follows_seed_and_epoch(shard_dir, image_processor, clip_tokenizer):
    dataset = _load(str(shard_dir / "*.tar"), image_processor, clip_tokenizer, shuffle_shards=True, seed=3)
    order = [i // 1_000_000 for i in _indices(dataset)][::SAMPLES_PER_SHARD]
    assert sorted(order) == list(range(5)) and order == [i // 1_000_000 for i in _indices(dataset)][::3]
    orders = set()
    for epoch in range(4):
        dataset.set_epoch(epoch)
        orders.add(tuple(i // 1_000_000 for i in _indices(dataset)[::SAMPLES_PER_SHARD]))
    assert len(orders) > 1


def test_pipe_urls_and_resampling(shard_dir, image_processor, clip_tokenizer):
    shards = [f"pipe:cat {shard_dir / f'shard-{shard:03d}.tar'}" for shard in range(2)]
    dataset = _load(shards, image_processor, clip_tokenizer)
    assert _indices(dataset) == _all_indices(2)
    missing = _load([f"pipe:cat {shard_dir / 'nope.tar'}"], image_processor, clip_tokenizer)
    assert list(missing) == [None] and "unreadable shard" in missing.bad_samples[0][2]
    resampled = _load(str(shard_dir / "*.tar"), image_processor, clip_tokenizer, resampled=True)
    drawn = [sample["index"] for sample, _ in zip(resampled, range(60))]
    assert set(drawn) <= set(_all_indices()) and len(set(drawn)) > SAMPLES_PER_SHARD


def _truncated_shard(directory, num=40):
    """A 40-sample shard cut at two thirds; returns it and how many samples are intact.

    A sample is intact when the header after its last member is there (which proves its members complete).
    """
    data = tar_bytes(_sample_members(range(num)))
    cut = len(data) * 2 // 3
    (directory / "cut.tar").write_bytes(data[:cut])
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        intact = sum(archive.getmember(f"{key + 1}.jpg").offset + 512 <= cut for key in range(num - 1))
    return directory / "cut.tar", intact


@pytest.mark.parametrize("random_access", [False, True])
def test_truncated_shard_counts_and_names_every_lost_sample(tmp_path, image_processor, clip_tokenizer, random_access):
    shard, intact = _truncated_shard(tmp_path)
    (tmp_path / "sizes.json").write_text(json.dumps({"cut.tar": 40}))
    dataset = _load(str(shard), image_processor, clip_tokenizer, random_access=random_access)
    samples = [dataset[i] for i in range(len(dataset))] if random_access else list(dataset)
    good = [sample["index"] for sample in samples if sample is not None]
    assert 20 < intact < 30 and len(samples) == 40 and good == list(range(intact))
    assert dataset.num_bad == 40 - intact
    sources = [source for _, source, _ in dataset.bad_samples]
    assert sources == [f"{shard}: sample {position}" for position in range(intact, 40)]
    assert all(reason.startswith("lost: unreadable shard") for _, _, reason in dataset.bad_samples)


@pytest.mark.parametrize("random_access", [False, True])
def test_damaged_shard_of_unknown_size_is_named(tmp_path, image_processor, clip_tokenizer, random_access):
    shard, intact = _truncated_shard(tmp_path)
    dataset = _load(str(shard), image_processor, clip_tokenizer, random_access=random_access)
    samples = [dataset[i] for i in range(len(dataset))] if random_access else list(dataset)
    assert len(samples) == intact + 1 and samples[-1] is None and all(sample is not None for sample in samples[:-1])
    assert dataset.num_bad == 1 and "unknown number" in dataset.bad_samples[0][2]
    assert [name for name, _ in dataset.lost_shards] == [str(shard)]


@pytest.mark.parametrize("random_access", [False, True])
def test_shard_cut_at_a_member_boundary_is_not_silent(tmp_path, image_processor, clip_tokenizer, random_access):
    members = _sample_members(range(4))
    data = tar_bytes(members)
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        end = archive.getmember("3.jpg").offset  # cut right before 3.jpg's header: no end-of-archive blocks
    (tmp_path / "cut.tar").write_bytes(data[:end])
    (tmp_path / "sizes.json").write_text(json.dumps({"cut.tar": 4}))
    dataset = _load(str(tmp_path / "cut.tar"), image_processor, clip_tokenizer, random_access=random_access)
    samples = [dataset[i] for i in range(len(dataset))] if random_access else list(dataset)
    # sample 2 is complete on disk but the archive's end is missing, so it cannot be trusted: counted as lost
    assert [s is None for s in samples] == [False, False, True, True]
    assert [source.rsplit(": ", 1)[1] for _, source, _ in dataset.bad_samples] == ["sample 2", "sample 3"]


@pytest.mark.parametrize("random_access", [False, True])
def test_unreadable_shard_counts_all_its_samples(shard_dir, image_processor, clip_tokenizer, random_access):
    (shard_dir / "shard-001.tar").write_bytes(b"this is not a tar file" * 50)
    dataset = _load(str(shard_dir / "*.tar"), image_processor, clip_tokenizer, random_access=random_access)
    samples = [dataset[i] for i in range(len(dataset))] if random_access else list(dataset)
    assert len(samples) == 15 and dataset.num_bad == SAMPLES_PER_SHARD
    assert {source.split(": ")[0] for _, source, _ in dataset.bad_samples} == {str(shard_dir / "shard-001.tar")}


def test_random_access_matches_streaming(shard_dir, image_processor, clip_tokenizer):
    streamed = list(_load(str(shard_dir / "*.tar"), image_processor, clip_tokenizer))
    indexed = _load(str(shard_dir / "*.tar"), image_processor, clip_tokenizer, random_access=True)
    assert isinstance(indexed, TarShardDataset) and len(indexed) == 15
    assert indexed.split_index(7) == (str(shard_dir / "shard-002.tar"), 1)
    order = [11, 0, 14, 5]
    for index in order:
        sample = indexed[index]
        assert sample["index"] == index
        torch.testing.assert_close(sample["pixel_values"], streamed[index]["pixel_values"])
        assert torch.equal(sample["input_ids"], streamed[index]["input_ids"])
    loader = DataLoader(indexed, batch_size=4, num_workers=2, collate_fn=ImageTextCollator())
    assert [i for batch in loader for i in batch["index"].tolist()] == list(range(15))
    with pytest.raises(IndexError):
        indexed[15]


def test_bad_inputs_are_refused_before_reading(shard_dir, image_processor, clip_tokenizer):
    with pytest.raises(ValueError, match="shards not found: .*missing.tar"):
        _load([str(shard_dir / "missing.tar")], image_processor, clip_tokenizer)
    with pytest.raises(ValueError, match="needs local .tar shards"):
        _load(["pipe:cat x.tar"], image_processor, clip_tokenizer, random_access=True)
    with pytest.raises(ValueError, match="pass both rank and world_size"):
        WebDatasetImageText(str(shard_dir / "*.tar"), None, None, rank=0)
    gzip_shard = shard_dir / "compressed.tar.gz"
    gzip_shard.write_bytes(gzip.compress((shard_dir / "shard-000.tar").read_bytes()))
    with pytest.raises(ValueError, match="compressed.tar.gz: a compressed shard; random access"):
        _load(str(gzip_shard), image_processor, clip_tokenizer, random_access=True)
    assert len(list(_load(str(gzip_shard), image_processor, clip_tokenizer))) == SAMPLES_PER_SHARD  # streams
    (shard_dir / "sizes.json").write_text(json.dumps({"shard-000.tar": "many"}))
    with pytest.raises(ValueError, match="sample count of shard-000.tar must be a non-negative integer"):
        _load(str(shard_dir / "*.tar"), image_processor, clip_tokenizer)


class _ReadInWorker(torch.utils.data.Dataset):
    """``dataset[i]`` read in a data-loader worker, with whether the files the parent had open are closed there."""

    def __init__(self, dataset, parent_files):
        self.dataset, self.parent_files = dataset, parent_files

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        sample = self.dataset[index]
        return sample["index"], sample["pixel_values"], all(handle.closed for handle in self.parent_files)


def test_random_access_keeps_each_shard_open_per_process(shard_dir, image_processor, clip_tokenizer, monkeypatch):
    from mllm_encoder.data import webdataset

    opened = []

    def recording_open(path, mode="r"):
        opened.append(open(path, mode))
        return opened[-1]

    indexed = _load(str(shard_dir / "*.tar"), image_processor, clip_tokenizer, random_access=True)
    monkeypatch.setattr(webdataset, "open", recording_open, raising=False)
    expected = {index: indexed[index]["pixel_values"] for index in (0, 1, 2, 0, 4, 3)}  # shards 0 and 1
    assert [handle.name for handle in opened] == [str(shard_dir / "shard-000.tar"), str(shard_dir / "shard-001.tar")]
    parent_files = list(opened)
    loader = DataLoader(
        _ReadInWorker(indexed, parent_files), batch_size=None, num_workers=2, multiprocessing_context="fork"
    )
    read = list(loader)
    assert [index for index, _, _ in read] == list(range(15))
    assert all(closed for _, _, closed in read), "a forked worker must not read through the parent's files"
    for index, pixel_values, _ in read[:5]:
        torch.testing.assert_close(pixel_values, expected[index], rtol=0, atol=0)
    assert not any(handle.closed for handle in parent_files)  # the workers closed only their copies
    indexed.MAX_OPEN_SHARDS = 2
    indexed[7]  # shard 2: shard 0, the least recently read, is closed
    assert parent_files[0].closed and not parent_files[1].closed and len(opened) == 3
    copy = pickle.loads(pickle.dumps(indexed))  # what a spawned worker gets: no open files
    torch.testing.assert_close(copy[1]["pixel_values"], expected[1], rtol=0, atol=0)
    assert len(opened) == 4 and opened[-1] is not parent_files[0]
    indexed.close()
    assert all(handle.closed for handle in opened[:3])
    torch.testing.assert_close(indexed[0]["pixel_values"], expected[0], rtol=0, atol=0)  # reopened
