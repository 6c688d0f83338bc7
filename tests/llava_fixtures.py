"""Tiny, offline LLaVA + CLIP-MoE checkpoints and data for tests (no downloads; importable from any test
directory, like ``tiny_models``).

* :func:`build_tiny_tokenizer`: a Llama-compatible sentencepiece tokenizer trained on the fly;
* :func:`build_tiny_llama`: a base LLM directory (what ``--model_name_or_path`` points to);
* :func:`build_tiny_llava`: a complete LLaVA checkpoint with a CLIP-MoE tower, loadable with
  ``llava.model.builder.load_pretrained_model`` after :func:`llava_patch.apply`;
* :func:`synthetic_image`: a noisy one-colour image;
* :func:`write_synthetic_conversations`: LLaVA-format training JSON with images.
"""

import io
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Union

import sentencepiece as spm
import torch
from PIL import Image
from tiny_models import build_tiny_clip_moe
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import llava_patch

PathLike = Union[str, os.PathLike]

_TOKENIZER_CORPUS = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "USER: What is in the image? ASSISTANT: A red square on a blue background.",
    "Is there a cat in the image? Please answer yes or no. Yes. No.",
    "What color is the shape? Describe the picture briefly. It is green, white, black and yellow.",
    "The quick brown fox jumps over the lazy dog 0123456789.",
)
COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}


def build_tiny_tokenizer(out_dir: PathLike, vocab_size: int = 320, user_defined_symbols: tuple = ()):
    """Train a byte-fallback BPE sentencepiece model and save it as a ``LlamaTokenizer`` directory
    (``user_defined_symbols``: strings that are always one token)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_TOKENIZER_CORPUS * 8),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
        user_defined_symbols=list(user_defined_symbols),
    )
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "model_max_length": 2048,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return AutoTokenizer.from_pretrained(str(out_dir), use_fast=False)


def build_tiny_llama(
    out_dir: PathLike, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, seed: int = 0
) -> Path:
    """A random ``LlamaForCausalLM`` (hidden 64, 2 layers) with the tiny tokenizer: a stand-in for Vicuna."""
    out_dir = Path(out_dir)
    tokenizer = build_tiny_tokenizer(out_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def synthetic_image(color: str, size: int, seed: int):
    """A ``size`` x ``size + 8`` RGB image of one of :data:`COLORS` with seeded noise."""

    generator = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 40, (size, size + 8, 3), generator=generator)
    pixels = (torch.tensor(COLORS[color]) - noise).clamp(0, 255).to(torch.uint8)
    return Image.fromarray(pixels.numpy())


def write_synthetic_conversations(
    out_dir: PathLike, num_samples: int = 8, plain: bool = False, image_size: int = 32
) -> Dict[str, Path]:
    """Write images and a LLaVA training JSON; ``plain`` makes pretraining (caption) samples.

    Returns ``{"data_path": json file, "image_folder": folder}``.
    """
    out_dir = Path(out_dir)
    image_folder = out_dir / "images"
    image_folder.mkdir(parents=True, exist_ok=True)
    samples: List[Dict[str, Any]] = []
    names = sorted(COLORS)
    for index in range(num_samples):
        color = names[index % len(names)]
        file = f"{index:03d}_{color}.png"
        synthetic_image(color, image_size, index).save(image_folder / file)
        if plain:
            turns = [("<image>", f"a {color} picture")]
        else:
            turns = [("<image>\nWhat color is the image?", f"It is {color}.")]
            turns += [("Is it red? Answer yes or no.", "Yes." if color == "red" else "No.")] * (index % 2)
        conversation = [
            {"from": speaker, "value": value}
            for question, answer in turns
            for speaker, value in (("human", question), ("gpt", answer))
        ]
        samples.append({"id": str(index), "image": file, "conversations": conversation})
    data_path = out_dir / ("pretrain.json" if plain else "finetune.json")
    data_path.write_text(json.dumps(samples, indent=1))
    return {"data_path": data_path, "image_folder": image_folder}


def build_tiny_llava(
    out_dir: PathLike,
    clip_moe_dir: Optional[PathLike] = None,
    llm_dir: Optional[PathLike] = None,
    select_layer: int = -2,
    seed: int = 0,
) -> Path:
    """A random LLaVA-1.5-style checkpoint (mlp2x_gelu projector) with a tiny CLIP-MoE tower.

    Missing ``clip_moe_dir`` / ``llm_dir`` are built next to ``out_dir``. Name ``out_dir`` with ``llava`` in it
    for LLaVA's ``load_pretrained_model`` (it checks the name). Returns ``out_dir``.
    """
    llava_patch.apply()
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM  # importable once patched

    out_dir = Path(out_dir)
    clip_moe_dir = Path(clip_moe_dir or build_tiny_clip_moe(out_dir.parent / f"{out_dir.name}-clip-moe"))
    llm_dir = Path(llm_dir or build_tiny_llama(out_dir.parent / f"{out_dir.name}-llm", seed=seed))
    torch.manual_seed(seed)
    model = LlavaLlamaForCausalLM.from_pretrained(str(llm_dir))
    model_args = SimpleNamespace(
        vision_tower=f"clip-moe:{clip_moe_dir}",
        mm_vision_select_layer=select_layer,
        mm_vision_select_feature="patch",
        pretrain_mm_mlp_adapter=None,
        mm_patch_merge_type="flat",
        mm_projector_type="mlp2x_gelu",
    )
    model.get_model().initialize_vision_modules(model_args=model_args)
    tokenizer = AutoTokenizer.from_pretrained(str(llm_dir), use_fast=False)
    model.config.update(
        dict(
            image_aspect_ratio="pad",
            tokenizer_padding_side="right",
            tokenizer_model_max_length=256,
            mm_use_im_start_end=False,
            mm_use_im_patch_token=False,
            use_cache=True,
        )
    )
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    if not (out_dir / "tokenizer.model").exists():  # transformers 5 saves tokenizer.json only
        shutil.copy(llm_dir / "tokenizer.model", out_dir / "tokenizer.model")
    return out_dir
