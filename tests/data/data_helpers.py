"""Helpers shared by the data and zero-shot evaluation tests (imported by module name)."""

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CONTEXT_LENGTH = 16
IMAGE_SIZE = 32


def _bytes_to_unicode():
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def write_test_clip_tokenizer(out_dir: Path) -> Path:
    """OpenAI CLIP BPE files (vocab.json, merges.txt) from the vocabulary in the open_clip wheel."""
    try:
        from mllm_encoder.conversion.tokenizer import write_clip_tokenizer
    except ImportError:
        write_clip_tokenizer = None
    if write_clip_tokenizer is not None:
        write_clip_tokenizer(out_dir, context_length=77)
        return out_dir
    open_clip = pytest.importorskip("open_clip")
    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    symbols = _bytes_to_unicode()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return out_dir


def random_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A random RGB image."""
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), mode="RGB")


def tar_bytes(members) -> bytes:
    """An uncompressed tar archive of ``(name, bytes)`` members, in order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def folder_digest(folder: Path) -> str:
    """SHA-256 over every file's relative path and bytes, in sorted order: equal digests = identical trees."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()
