"""Bad samples are skipped and counted; too many stop the run; malformed files name the file and record."""

import io
import json
import tarfile

import pytest
from data_helpers import CONTEXT_LENGTH, tar_bytes

from mllm_encoder.data import BadSampleFractionError, ImageTextCollator, load_image_text_dataset


def _turns(caption):
    return [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption}]


@pytest.fixture
def broken_dataset(image_files, image_processor, clip_tokenizer):
    """Five good samples plus a truncated JPEG, a missing file, an empty caption and a non-image file."""
    root, captions = image_files
    good = (root / "img0.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "not_an_image.jpg").write_text("hello")
    records = [{"image": f"img{i}.jpg", "conversations": _turns(c)} for i, c in enumerate(captions)]
    records += [
        {"image": "truncated.jpg", "conversations": _turns("a truncated file")},
        {"image": "missing.jpg", "conversations": _turns("a missing file")},
        {"image": "img1.jpg", "conversations": _turns("   ")},
        {"image": "not_an_image.jpg", "conversations": _turns("text, not pixels")},
    ]
    (root / "data.json").write_text(json.dumps(records))
    return load_image_text_dataset(
        root / "data.json",
        image_processor=image_processor,
        tokenizer=clip_tokenizer,
        context_length=CONTEXT_LENGTH,
    )


def test_bad_samples_are_skipped_and_counted(broken_dataset, caplog):
    samples = [broken_dataset[i] for i in range(len(broken_dataset))]
    assert [s is None for s in samples] == [False] * 5 + [True] * 4
    assert broken_dataset.num_bad == 4
    reasons = {index: reason for index, _, reason in broken_dataset.bad_samples}
    assert "truncated" in reasons[5] and "missing.jpg" in reasons[6] and reasons[7] == "empty caption"
    assert "not_an_image.jpg" in reasons[8]
    assert "data.json: record 6" in caplog.text
    batch = ImageTextCollator(max_bad_fraction=0.5)(samples)
    assert batch["index"].tolist() == [0, 1, 2, 3, 4]


def test_bad_fraction_stops_with_the_failed_files(broken_dataset):
    collator = ImageTextCollator(max_bad_fraction=0.01, min_samples=4, dataset=broken_dataset)
    assert collator([broken_dataset[i] for i in range(4)])["index"].tolist() == [0, 1, 2, 3]
    with pytest.raises(BadSampleFractionError, match=r"2 of 7 samples were bad .*truncated.jpg.*missing.jpg"):
        collator([broken_dataset[i] for i in range(4, 7)])


def test_bad_fraction_below_threshold_and_final_check(broken_dataset):
    collator = ImageTextCollator(max_bad_fraction=0.5, min_samples=100, dataset=broken_dataset)
    assert collator([broken_dataset[6], broken_dataset[7]]) is None  # all bad: no batch, no error yet
    collator([broken_dataset[i] for i in range(5)])
    collator.check()  # 2 of 7 <= 50%
    strict = ImageTextCollator(max_bad_fraction=0.1, min_samples=100)
    strict([broken_dataset[0], broken_dataset[6]])
    with pytest.raises(BadSampleFractionError, match="see the warnings"):
        strict.check()
    with pytest.raises(ValueError, match="max_bad_fraction"):
        ImageTextCollator(max_bad_fraction=2)


@pytest.mark.parametrize(
    "records,message",
    [
        ({"image": "a.jpg"}, "expected a JSON list"),
        (
            [{"image": "img0.jpg", "conversations": _turns("ok")}, ["not", "a", "dict"]],
            "record 1: expected an object",
        ),
        ([{"image": "img0.jpg", "conversations": [{"value": "only one turn"}]}], "record 0: 'conversations'"),
        (
            [{"image": "img0.jpg", "conversations": [{"value": "q"}, {"text": "a"}]}],
            r"record 0: conversations\[1\]",
        ),
        ([{"image": 3, "conversations": _turns("x")}], "record 0: 'image' must be a string"),
    ],
)
def test_wrong_json_shape_names_file_and_record(image_files, image_processor, clip_tokenizer, records, message):
    root, _ = image_files
    (root / "bad.json").write_text(json.dumps(records))
    with pytest.raises(ValueError, match=f"bad.json: {message}"):
        load_image_text_dataset(root / "bad.json", image_processor=image_processor, tokenizer=clip_tokenizer)


def test_invalid_json_and_jsonl_name_the_line(image_files, image_processor, clip_tokenizer):
    root, _ = image_files
    (root / "broken.json").write_text('[\n{"image": "img0.jpg",\n "conversations": [}\n]')
    with pytest.raises(ValueError, match="broken.json: line 3: invalid JSON"):
        load_image_text_dataset(root / "broken.json", image_processor=image_processor, tokenizer=clip_tokenizer)
    good = json.dumps({"image": "img0.jpg", "conversations": _turns("fine")})
    (root / "broken.jsonl").write_text(good + "\n" + good + "\n{oops\n")
    with pytest.raises(ValueError, match="broken.jsonl: line 3: invalid JSON"):
        load_image_text_dataset(root / "broken.jsonl", image_processor=image_processor, tokenizer=clip_tokenizer)


def test_csv_short_row_names_the_line(image_files, image_processor, clip_tokenizer):
    root, _ = image_files
    (root / "pairs.csv").write_text("image,caption\nimg0.jpg,a caption\nimg1.jpg\n")
    with pytest.raises(ValueError, match="pairs.csv: line 3: row has fewer fields"):
        load_image_text_dataset(root / "pairs.csv", image_processor=image_processor, tokenizer=clip_tokenizer)


def test_webdataset_bad_members_and_truncated_shard(image_files, image_processor, clip_tokenizer):
    root, _ = image_files
    members = [
        ("0.jpg", (root / "img0.jpg").read_bytes()),
        ("0.txt", b"good"),
        ("1.jpg", b"garbage"),
        ("1.txt", b"corrupt image"),
        ("2.jpg", (root / "img1.jpg").read_bytes()),
        ("2.txt", b""),
        ("3.txt", b"caption without image"),
        ("4.jpg", (root / "img2.jpg").read_bytes()),
        ("4.txt", b"good again"),
    ]
    data = tar_bytes(members)
    (root / "good.tar").write_bytes(data)
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        cut = archive.getmember("1.jpg").offset_data + 3  # 1.jpg's data is cut short
    (root / "cut.tar").write_bytes(data[:cut])
    dataset = load_image_text_dataset(
        [str(root / "good.tar"), str(root / "cut.tar")],
        format="webdataset",
        image_processor=image_processor,
        tokenizer=clip_tokenizer,
        context_length=CONTEXT_LENGTH,
        shard_stride=10,
    )
    samples = list(dataset)
    assert [s["index"] for s in samples if s is not None] == [0, 4, 10]
    reasons = [reason for _, _, reason in dataset.bad_samples]
    assert reasons[:3] == [
        "cannot decode image: " + reasons[0].split(": ", 1)[1],
        "empty or missing caption",
        "no image member",
    ]
    # 1.jpg of cut.tar is cut short: sample 1 and the unknown rest of that shard are lost, and said so
    assert "unreadable shard" in reasons[-1] and "unknown number" in reasons[-1]
    assert dataset.bad_samples[-1][1] == f"{root / 'cut.tar'}: sample 1" and len(samples) == 5 + 2
    assert [name for name, _ in dataset.lost_shards] == [str(root / "cut.tar")]


@pytest.mark.parametrize("image", ["../../etc/passwd", "sub/../../outside.jpg", "/etc/passwd"])
@pytest.mark.parametrize("suffix", ["json", "csv"])
def test_image_paths_leaving_the_image_root_are_refused(image_files, image_processor, clip_tokenizer, image, suffix):
    root, _ = image_files
    if suffix == "json":
        records = [{"image": "img0.jpg", "conversations": _turns("ok")}, {"image": image, "conversations": _turns("x")}]
        (root / "data.json").write_text(json.dumps(records))
        where = "data.json: record 1"
    else:
        (root / "data.csv").write_text(f"image,caption\nimg0.jpg,ok\n{image},x\n")
        where = "data.csv: line 3"
    kwargs = dict(image_processor=image_processor, tokenizer=clip_tokenizer)
    with pytest.raises(ValueError, match=rf"{where}: (absolute image path '/etc/passwd' refused|.* leaves the image)"):
        load_image_text_dataset(root / f"data.{suffix}", **kwargs)
    if image.startswith("/"):
        dataset = load_image_text_dataset(root / f"data.{suffix}", allow_absolute_paths=True, **kwargs)
        assert dataset.records[1].image == "/etc/passwd"
    else:
        with pytest.raises(ValueError, match="leaves the image root"):
            load_image_text_dataset(root / f"data.{suffix}", allow_absolute_paths=True, **kwargs)


def test_an_empty_training_list_is_refused(image_files, image_processor, clip_tokenizer):
    root, _ = image_files
    (root / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match="empty.json: no image-caption records"):
        load_image_text_dataset(root / "empty.json", image_processor=image_processor, tokenizer=clip_tokenizer)
