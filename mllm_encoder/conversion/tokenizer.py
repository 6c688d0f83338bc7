"""The OpenAI CLIP BPE tokenizer as Hugging Face tokenizer files, built from the vocabulary that ships
inside the ``open_clip_torch`` wheel (``bpe_simple_vocab_16e6.txt.gz``), so no download is needed."""

import gzip
import importlib.util
import logging
import os
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Union

from mllm_encoder.checkpoint import make_tokenizer_files_portable, write_slow_tokenizer_files

logger = logging.getLogger(__name__)

OPENAI_VOCAB_SIZE = 49408
NUM_MERGES = 49152 - 256 - 2
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"


def byte_to_unicode_table() -> Dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def bundled_bpe_path() -> Path:
    """Path of the OpenAI BPE merges file inside the installed open_clip package."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise ValueError(
            "the OpenAI BPE vocabulary ships with open_clip_torch: `pip install open_clip_torch` "
            "(extra `convert`), or pass the tokenizer directory of an existing CLIP checkpoint"
        )
    return Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"


def read_bpe_merges(path: Union[str, os.PathLike]) -> List[str]:
    """The merge rules (``"a b"`` lines) of an OpenAI ``bpe_simple_vocab_16e6.txt.gz``."""
    with gzip.open(path, "rt", encoding="utf-8") as stream:
        lines = stream.read().split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    if len(merges) != NUM_MERGES or any(len(m.split()) != 2 for m in merges):
        raise ValueError(f"{path}: not an OpenAI CLIP BPE merges file")
    return merges


def build_vocab(merges: List[str]) -> Dict[str, int]:
    """Token -> id, in OpenAI CLIP's order: bytes, bytes + ``</w>``, merges, then the two special tokens."""
    symbols = list(byte_to_unicode_table().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += [START_OF_TEXT, END_OF_TEXT]
    return {token: index for index, token in enumerate(tokens)}


def _construct_tokenizer(vocab: Dict[str, int], merges: List[str], scratch: Path, context_length: int):
    import transformers

    special = dict(bos_token=START_OF_TEXT, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT, unk_token=END_OF_TEXT)
    if int(transformers.__version__.split(".")[0]) >= 5:
        pairs = [tuple(m.split()) for m in merges]
        return transformers.CLIPTokenizer(vocab=vocab, merges=pairs, model_max_length=context_length, **special)
    vocab_file, merges_file = write_slow_tokenizer_files(scratch, vocab, merges)
    return transformers.CLIPTokenizerFast(
        vocab_file=str(vocab_file), merges_file=str(merges_file), model_max_length=context_length, **special
    )


def build_clip_tokenizer(context_length: int = 77, bpe_path: Optional[Union[str, os.PathLike]] = None):
    """The OpenAI CLIP tokenizer, in memory.

    Padding uses ``<|endoftext|>`` and ``model_max_length`` is ``context_length``, as in HF's OpenAI CLIP
    checkpoints.
    """
    merges = read_bpe_merges(bpe_path or bundled_bpe_path())
    with tempfile.TemporaryDirectory() as scratch:
        return _construct_tokenizer(build_vocab(merges), merges, Path(scratch), context_length)


def write_clip_tokenizer(
    out_dir: Union[str, os.PathLike],
    context_length: int = 77,
    bpe_path: Optional[Union[str, os.PathLike]] = None,
):
    """Write the OpenAI CLIP tokenizer's files to ``out_dir`` and return the tokenizer."""
    tokenizer = build_clip_tokenizer(context_length, bpe_path)
    tokenizer.save_pretrained(out_dir)
    make_tokenizer_files_portable(out_dir)
    logger.info("wrote the OpenAI CLIP tokenizer (context %d) to %s", context_length, out_dir)
    return tokenizer
