"""Indexes built once: the compact record index and the tar-shard index files, reused and split over ranks."""

import json
import os

import numpy as np
import pytest
from data_helpers import CONTEXT_LENGTH, tar_bytes

from mllm_encoder.data import build_record_index, build_shard_index, load_image_text_dataset, read_image_text_records
from mllm_encoder.data import records as records_module
from mllm_encoder.data import webdataset as webdataset_module
from mllm_encoder.data.records import RecordIndex, index_bytes


def _sharegpt4v(path, count):
    records = [
        {"image": f"images/{i:05d}.jpg", "conversations": [{"value": "q"}, {"value": f"caption {i} " * (i % 7 + 1)}]}
        for i in range(count)
    ]
    records[3] = {"conversations": [{"value": "text only"}, {"value": "no image"}]}
    path.write_text(json.dumps(records))
    return path


def test_record_index_equals_the_records_and_keeps_offsets_only(tmp_path):
    data = _sharegpt4v(tmp_path / "train.json", 500)
    index = build_record_index(data, index_dir=tmp_path / "index")
    expected = read_image_text_records(data)
    assert len(index) == len(expected) == 499
    assert list(index) == expected
    assert index[-1] == expected[-1] and index.caption(10) == expected[10].caption
    with pytest.raises(IndexError, match="out of range"):
        index[499]
    # three int64 offset arrays, the strings memory-mapped from the index directory
    assert index_bytes(index) == 3 * 8 * 500
    assert index_bytes(build_record_index(data)) > 3 * 8 * 500  # in memory: the strings too


def test_a_saved_record_index_is_reused_and_rebuilt_when_the_data_changes(tmp_path, monkeypatch):
    data = _sharegpt4v(tmp_path / "train.json", 20)
    build_record_index(data, index_dir=tmp_path / "index")
    reads = []
    original = records_module.iter_image_text_records
    monkeypatch.setattr(records_module, "iter_image_text_records", lambda *a: reads.append(a) or original(*a))
    assert len(build_record_index(data, index_dir=tmp_path / "index")) == 19 and reads == []
    assert len(build_record_index(data, image_root="elsewhere", index_dir=tmp_path / "index")) == 19
    assert len(reads) == 1  # another option: read again
    _sharegpt4v(data, 30)
    os.utime(data, ns=(1, 1))
    assert len(build_record_index(data, index_dir=tmp_path / "index")) == 29 and len(reads) == 2


def test_a_dataset_over_a_record_index_reads_the_same_samples(tmp_path, image_files, image_processor, clip_tokenizer):
    root, captions = image_files
    rows = ["image,caption"] + [f"img{i}.jpg,{caption}" for i, caption in enumerate(captions)] + ["missing.jpg,gone"]
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    kwargs = dict(image_processor=image_processor, tokenizer=clip_tokenizer, context_length=CONTEXT_LENGTH)
    in_memory = load_image_text_dataset(root / "pairs.csv", **kwargs)
    mapped = load_image_text_dataset(root / "pairs.csv", index_dir=tmp_path / "index", **kwargs)
    assert isinstance(mapped.records, RecordIndex) and len(mapped) == len(in_memory) > 0
    assert mapped.captions == in_memory.captions == captions + ["gone"]
    for i in range(len(mapped)):
        a, b = mapped[i], in_memory[i]
        assert (a is None) == (b is None) == (i == 5)
        if a is not None:
            assert a["pixel_values"].equal(b["pixel_values"]) and a["input_ids"].equal(b["input_ids"])
    assert mapped.num_bad == 1 and mapped.bad_samples[0][1].endswith("pairs.csv: line 7")


def _shards(folder, count, per_shard=3):
    for shard in range(count):
        members = []
        for key in range(shard * per_shard, (shard + 1) * per_shard):
            members += [(f"{key:04d}.jpg", b"jpeg %d" % key), (f"{key:04d}.txt", f"photo {key}".encode())]
        (folder / f"shard-{shard:02d}.tar").write_bytes(tar_bytes(members))
    return [str(folder / f"shard-{shard:02d}.tar") for shard in range(count)]


def test_each_rank_indexes_its_share_of_the_shards_and_every_rank_maps_all(tmp_path, monkeypatch):
    shards = _shards(tmp_path, 10)
    indexed = []
    original = webdataset_module.index_shard
    monkeypatch.setattr(webdataset_module, "index_shard", lambda path: indexed.append(path) or original(path))
    for rank in range(8):
        assert build_shard_index(shards, tmp_path / "index", rank, 8) == shards[rank::8]
    assert sorted(indexed) == shards  # every shard once, over all ranks
    assert build_shard_index(shards, tmp_path / "index", 0, 1) == []  # a resume reads no shard again
    mapped = webdataset_module.TarShardDataset(shards, None, None, index_dir=tmp_path / "index")
    assert len(indexed) == 10  # the dataset mapped the saved index files
    in_memory = webdataset_module.TarShardDataset(shards, None, None)
    assert len(mapped) == len(in_memory) == 30
    for saved, fresh in zip(mapped.indices, in_memory.indices):
        assert np.array_equal(saved.entries, fresh.entries) and saved.damage == fresh.damage
    assert [mapped.indices[4].key(i) for i in range(3)] == ["0012", "0013", "0014"]
    with open(shards[4], "rb") as handle:
        offset, size = mapped.indices[4].entries["caption"][1]
        handle.seek(offset)
        assert handle.read(size) == b"photo 13"


def test_a_changed_shard_is_indexed_again(tmp_path):
    shards = _shards(tmp_path, 2)
    build_shard_index(shards, tmp_path / "index")
    (tmp_path / "shard-01.tar").write_bytes(tar_bytes([("0099.jpg", b"x"), ("0099.txt", b"new")]))
    assert build_shard_index(shards, tmp_path / "index") == [shards[1]]
    dataset = webdataset_module.TarShardDataset(shards, None, None, index_dir=tmp_path / "index")
    assert len(dataset) == 4 and dataset.indices[1].key(0) == "0099"


def test_a_json_list_is_streamed_record_by_record_across_chunk_ends(tmp_path, monkeypatch):
    monkeypatch.setattr(records_module, "JSON_CHUNK", 7)  # every record crosses a chunk's end
    rng = np.random.default_rng(0)
    for case in range(100):
        data = [
            {"image": f"a{i}.jpg", "n": int(rng.integers(10**6)), "conversations": [{"value": "é\n" * i}]}
            for i in range(int(rng.integers(13)))
        ] + [123456789, [1, 22, 333]]
        text = json.dumps(data, indent=[None, 1, 2][case % 3])
        (tmp_path / "x.json").write_text(text + ["", "\n", "  \n"][case % 3])
        assert records_module.load_json_records(tmp_path / "x.json") == data
    for broken, line in [('[\n{"a": 1},\n{"b": }\n]', 3), ("[1, 2\n", 2), ("[1,]", 1), ("[1] 2", 1), ("[1\n 2]", 2)]:
        (tmp_path / "x.json").write_text(broken)
        with pytest.raises(ValueError, match=f"x.json: line {line}: invalid JSON"):
            records_module.load_json_records(tmp_path / "x.json")
    (tmp_path / "x.json").write_text('{"image": "a.jpg"}')
    with pytest.raises(ValueError, match="x.json: expected a JSON list of records, got an object"):
        records_module.load_json_records(tmp_path / "x.json")


class _Rank:
    """The accelerator of one of two processes, its collectives replaced by what the other rank sends."""

    def __init__(self, rank, other_error):
        self.process_index, self.num_processes, self.other_error, self.waited = rank, 2, other_error, False

    def gather(self, objects):
        return objects + [self.other_error] if self.process_index == 0 else [self.other_error] + objects

    def wait_for_everyone(self):
        self.waited = True


def test_a_build_error_on_one_rank_is_raised_on_every_rank(tmp_path, monkeypatch):
    import accelerate.utils

    from mllm_encoder.dmu.config import DataSection
    from mllm_encoder.dmu.resources import build_data_index

    (tmp_path / "broken.json").write_text('[{"image": "a.jpg", "conversations": [}]')
    data = DataSection(train=str(tmp_path / "broken.json"))
    message = f"{tmp_path / 'broken.json'}: line 1: invalid JSON"
    rank0, rank1 = _Rank(0, None), _Rank(1, message)
    for rank in (rank0, rank1):  # rank 0 reads the file and fails; rank 1 reads nothing and learns of it
        monkeypatch.setattr(accelerate.utils, "gather_object", rank.gather)
        with pytest.raises(ValueError, match="broken.json: line 1: invalid JSON"):
            build_data_index(data, tmp_path / "index", rank)
    assert not (tmp_path / "index").exists() and not rank0.waited and not rank1.waited
    good = _sharegpt4v(tmp_path / "good.json", 10)
    monkeypatch.setattr(accelerate.utils, "gather_object", rank1.gather)
    rank1.other_error = None
    build_data_index(DataSection(train=str(good)), tmp_path / "index", rank1)
    assert rank1.waited and not (tmp_path / "index").exists()  # only the main process writes a record index
