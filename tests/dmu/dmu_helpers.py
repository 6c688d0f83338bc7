"""Small stand-ins shared by the DMU tests: an in-memory image-text dataset and its collator."""

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
