"""Small stand-ins shared by the DMU tests: an in-memory image-text dataset and its collator, the shapes training
set as tar shards."""

import io
import json
import tarfile
from pathlib import Path

import torch


class TensorPairs(torch.utils.data.Dataset):
    """Random images and token ids; item ``i`` is the dict the real loaders produce."""

    def __init__(self, n: int = 48, image_size: int = 16, seq_len: int = 8, vocab: int = 64, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.pixels = torch.randn(n, 3, image_size, image_size, generator=generator)
        self.ids = torch.randint(1, vocab - 1, (n, seq_len), generator=generator)
        self.ids[:, -1] = vocab - 1  # eos

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int):
        return {
            "index": index,
            "pixel_values": self.pixels[index],
            "input_ids": self.ids[index],
            "attention_mask": torch.ones_like(self.ids[index]),
        }


def collate(items):
    items = [item for item in items if item is not None]
    return {
        "index": torch.tensor([item["index"] for item in items]),
        **{key: torch.stack([item[key] for item in items]) for key in ("pixel_values", "input_ids", "attention_mask")},
    }


def write_tar_shards(shapes_data, out_dir, num_shards=2):
    """The shapes training set as webdataset shards (keys 000000.., png + txt) with a sizes.json."""
    root = Path(shapes_data["train"]).parent
    records = json.loads(Path(shapes_data["train"]).read_text())
    per_shard = -(-len(records) // num_shards)
    out_dir.mkdir(parents=True)
    for shard in range(num_shards):
        with tarfile.open(out_dir / f"train-{shard}.tar", "w") as archive:
            for i in range(shard * per_shard, min((shard + 1) * per_shard, len(records))):
                caption = records[i]["conversations"][1]["value"].encode()
                for name, data in (
                    (f"{i:06d}.png", (root / records[i]["image"]).read_bytes()),
                    (f"{i:06d}.txt", caption),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    sizes = {f"train-{shard}.tar": min(per_shard, len(records) - shard * per_shard) for shard in range(num_shards)}
    (out_dir / "sizes.json").write_text(json.dumps(sizes))
    return str(out_dir / f"train-{{0..{num_shards - 1}}}.tar")


def tiny_run_values(run_dir, base, data, **dmu):
    """A ``clip-moe dmu run`` config (as a mapping) of a few steps per stage on the tiny base and the shapes data;
    ``dmu`` overrides the ``dmu`` section (3 experts, top-2, scikit-learn k-means by default)."""
    stage = dict(steps=4, batch_size=4, warmup_steps=1, lr=1e-3)
    return {
        "base_model": str(base),
        "run_dir": str(run_dir),
        "data": {"train": data["train"]},
        "dmu": {"num_experts": 3, "top_k": 2, "extract_batch_size": 16, "kmeans_backend": "sklearn", **dmu},
        "mcl": stage,
        "route": {**stage, "steps": 3},
        "baseline": stage,
        "runtime": {"save_every": 2, "log_every": 1, "mixed_precision": "no"},
    }
