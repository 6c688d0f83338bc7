"""The checkpoint-directory format, owned here: weights, config, image processor, tokenizer.

Every other module reads and writes checkpoint directories through these functions: :func:`read_config_dict`,
:func:`read_model_type`, :func:`read_vision_config_dict`, :func:`is_clip_moe_dir`, :func:`tensor_names`,
:func:`read_checkpoint_tensors`, :func:`read_weights_file`, :func:`save_checkpoint`, :func:`load_processors`, and
the OpenAI CLIP normalisation (:data:`OPENAI_CLIP_MEAN`, :data:`OPENAI_CLIP_STD`). See ``docs/checkpoints.md``.
"""

import json
import logging
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch
import transformers
from safetensors import SafetensorError, safe_open
from transformers import AutoTokenizer, CLIPImageProcessor, PreTrainedModel

from mllm_encoder.atomic import PathLike, atomic_directory, check_output
from mllm_encoder.families import DEFAULT_FAMILY, FAMILIES, OUR_MODEL_TYPES, family_of

logger = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# open_clip's names for the same two files (Hub repositories of open_clip models); read by `clip-moe convert`.
OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
WEIGHT_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
CLIP_MOE_MODEL_TYPES = OUR_MODEL_TYPES  # every family's own model_types (mllm_encoder.families)
# Every name save_checkpoint writes (transformers 4.x and 5.x): a directory holding anything else is not ours.
CHECKPOINT_FILE_PATTERN = re.compile(
    r"config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|preprocessor_config\.json"
    r"|tokenizer(_config)?\.json|vocab\.json|merges\.txt|special_tokens_map\.json|added_tokens\.json"
)
# Keys of a saved config.json that describe the file, not the model.
CONFIG_META_KEYS = ("model_type", "architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype")


def default_image_processor(image_size: int) -> CLIPImageProcessor:
    """OpenAI CLIP preprocessing for ``image_size``: bicubic shortest-side resize, centre crop, normalise."""
    return CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )


def read_config_dict(directory: PathLike, expected: str = "a CLIP or CLIP-MoE checkpoint directory") -> Dict[str, Any]:
    """``directory/config.json`` as a dict; ``ValueError`` naming the path when it is missing or not a JSON object.

    ``expected`` says, in the error of a missing directory or file, what the caller wanted there.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory}: no such directory (expected {expected})")
    path = directory / "config.json"
    if not path.is_file():
        raise ValueError(f"{directory}: no config.json (expected {expected})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({type(error).__name__}: {error})") from error
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(config).__name__}")
    return config


def read_model_type(directory: PathLike) -> str:
    """The ``model_type`` in ``directory/config.json``."""
    config = read_config_dict(directory)
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise ValueError(f"{Path(directory) / 'config.json'}: model_type must be a string, got {model_type!r}")
    return model_type


def read_vision_config_dict(directory: PathLike) -> Dict[str, Any]:
    """The image-tower part of ``directory/config.json`` (of a two-tower or a vision-tower checkpoint)."""
    config = read_config_dict(directory)
    return config.get("vision_config", config)


def _try_config_dict(directory: PathLike) -> Optional[Dict[str, Any]]:
    try:
        return read_config_dict(directory)
    except ValueError:
        return None


def is_clip_moe_dir(directory: PathLike) -> bool:
    """Whether ``directory`` holds one of our models (a ``model_type`` of ours, or experts in the config)."""
    config = _try_config_dict(directory)
    if config is None:
        return False
    vision = config.get("vision_config") or {}
    return config.get("model_type") in CLIP_MOE_MODEL_TYPES or "num_experts" in vision or "num_experts" in config


def is_clip_moe_checkpoint(directory: PathLike) -> bool:
    """Whether ``directory`` is a checkpoint as :func:`save_checkpoint` writes it (and holds nothing else)."""
    config = _try_config_dict(directory)
    return (
        config is not None
        and config.get("model_type") in CLIP_MOE_MODEL_TYPES
        and all(
            CHECKPOINT_FILE_PATTERN.fullmatch(entry.name) and entry.is_file() for entry in Path(directory).iterdir()
        )
    )


def check_output_dir(out_dir: PathLike, inputs: Iterable[PathLike] = (), overwrite: bool = False) -> None:
    """Raise ``ValueError`` unless a checkpoint may be written to ``out_dir``; call it before any work.

    The output rule (:func:`mllm_encoder.atomic.check_output`), stricter for checkpoints: a non-empty directory
    that is not a CLIP-MoE checkpoint (see :func:`is_clip_moe_checkpoint`) is refused even with ``overwrite``;
    an existing checkpoint is replaced only with ``overwrite``. An absent or empty directory is fine.
    """
    ours = check_output(
        out_dir,
        inputs,
        ours=is_clip_moe_checkpoint,
        directory=True,
        what="a CLIP-MoE checkpoint directory",
        foreign_replaceable=False,
    )
    if ours and not overwrite:
        raise ValueError(f"{out_dir}: a checkpoint already exists there; pass --overwrite to replace it")


def save_checkpoint(
    model: PreTrainedModel,
    out_dir: PathLike,
    image_processor: Optional[CLIPImageProcessor] = None,
    tokenizer=None,
    max_shard_size: str = "5GB",
    overwrite: bool = False,
    inputs: Sequence[PathLike] = (),
) -> Path:
    """Write ``model`` as a complete checkpoint directory, atomically.

    Writes ``config.json``, ``model.safetensors`` (sharded above ``max_shard_size``),
    ``preprocessor_config.json`` (``image_processor`` or OpenAI CLIP's for the model's image size) and, when
    given, the tokenizer files (:func:`make_tokenizer_files_portable`: readable by transformers 4.37 and 5.x
    whichever wrote them). A model with a text tower saved without a tokenizer logs a warning.
    ``out_dir`` must pass :func:`check_output_dir` (``overwrite`` replaces an existing CLIP-MoE checkpoint;
    ``inputs`` are the directories the model was read from, never replaced).
    """
    out_dir = Path(out_dir)
    check_output_dir(out_dir, inputs, overwrite)
    check_finite(model, f"{', '.join(map(str, inputs)) or 'the model'} -> {out_dir}")
    processor = image_processor or _family_image_processor(model)
    with atomic_directory(out_dir, overwrite=overwrite) as staging:
        model.save_pretrained(staging, safe_serialization=True, max_shard_size=max_shard_size)
        processor.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
            make_tokenizer_files_portable(staging)  # readable by transformers 4.37 and 5.x alike
        elif hasattr(model.config, "text_config"):
            logger.warning("%s: saved without tokenizer files (pass tokenizer=...)", out_dir)
    return out_dir


def write_slow_tokenizer_files(directory: Path, vocab: Dict[str, int], merges: List[str]) -> Tuple[Path, Path]:
    """The slow BPE tokenizer's two files, ``vocab.json`` and ``merges.txt`` (``"a b"`` lines), in ``directory``."""
    vocab_file, merges_file = directory / "vocab.json", directory / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_file, merges_file


def make_tokenizer_files_portable(directory: PathLike) -> None:
    """Make the BPE tokenizer saved in ``directory`` readable by both supported environments, as hub CLIP
    directories are: ``tokenizer.json``'s merges as ``"a b"`` strings (tokenizers 0.20+, i.e. transformers 5,
    write ``["a", "b"]`` pairs, which the tokenizers of transformers 4.37 cannot parse; newer versions read
    both) and the slow tokenizer's ``vocab.json`` and ``merges.txt`` beside it. Other tokenizers are left as
    they are."""
    directory = Path(directory)
    path = directory / "tokenizer.json"
    if not path.is_file():
        return
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    model = tokenizer.get("model") or {}
    merges = model.get("merges")
    if model.get("type") != "BPE" or not isinstance(merges, list):
        return
    pairs = [merge if isinstance(merge, list) else merge.split(" ") for merge in merges]
    if any(len(pair) != 2 or any(" " in part for part in pair) for pair in pairs):
        return  # not expressible as "a b" lines
    lines = [" ".join(pair) for pair in pairs]
    if merges != lines:
        model["merges"] = lines
        path.write_text(json.dumps(tokenizer, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if not (directory / "vocab.json").exists() and not (directory / "merges.txt").exists():
        write_slow_tokenizer_files(directory, model["vocab"], lines)


def check_finite(model: torch.nn.Module, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` and the first tensor that holds NaN or infinite values (such weights
    are never loaded nor written: they would spread through every model built from them)."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{where}: tensor {name} holds NaN or infinite values (a damaged or diverged model)")


def has_tokenizer(directory: PathLike) -> bool:
    """Whether ``directory`` holds tokenizer files."""
    return any((Path(directory) / name).exists() for name in TOKENIZER_FILES)


def _family_image_processor(model: PreTrainedModel):
    """The default preprocessing of ``model``'s family: its ``Family.image_processor`` class with the image
    tower config's ``image_processor_settings()`` (OpenAI CLIP's resize and crop; SigLIP's square resize, no
    crop; SigLIP 2 NaFlex's patches up to the position grid's count)."""
    vision = getattr(model.config, "vision_config", model.config)
    family = family_of(model.config.model_type)
    processor_class = image_processor_class(family.image_processor, f"saving a {type(model).__name__}")
    return processor_class(**vision.image_processor_settings())


def image_processor_class(processor_type: Optional[str], where: str):
    """The image processor class a saved ``image_processor_type`` names when a family's checkpoints use it
    (``Family.image_processor``; SigLIP's read as a ``CLIPImageProcessor`` would crop to 224), else
    ``CLIPImageProcessor``. ``ValueError`` naming ``where`` when this transformers lacks the class."""
    name = str(processor_type or "").removesuffix("Fast")
    if name not in {family.image_processor for family in FAMILIES.values()}:
        name = DEFAULT_FAMILY.image_processor
    processor_class = getattr(transformers, name, None)
    if processor_class is None:
        raise ValueError(f"{where}: needs {name}, which transformers {transformers.__version__} does not have")
    return processor_class


def load_image_processor(directory: PathLike):
    """The image processor saved in a checkpoint directory, as its family's class (:func:`image_processor_class`)."""
    path = Path(directory) / "preprocessor_config.json"
    if not path.exists():
        raise ValueError(f"{directory}: no preprocessor_config.json (not a complete checkpoint directory)")
    processor_type = json.loads(path.read_text(encoding="utf-8")).get("image_processor_type")
    return image_processor_class(processor_type, str(path)).from_pretrained(directory)


def load_processors(directory: PathLike) -> Tuple[CLIPImageProcessor, Optional[object]]:
    """The image processor and (when present) the tokenizer saved in a checkpoint directory."""
    image_processor = load_image_processor(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory) if has_tokenizer(directory) else None
    return image_processor, tokenizer


def _weight_files(directory: Path, prefix: str) -> List[Path]:
    """The weight files of ``directory`` holding tensors named ``prefix...``: the shards of an index, else one file."""
    for name in WEIGHT_INDEX_FILES:
        index = directory / name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                shards = sorted({s for k, s in weight_map.items() if k.startswith(prefix)})
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as error:
                raise ValueError(f"{index}: not a weight index ({type(error).__name__}: {error})") from error
            missing = [shard for shard in shards if not (directory / shard).is_file()]
            if missing:
                raise ValueError(f"{index}: lists shard(s) that are missing: {missing}")
            return [directory / shard for shard in shards]
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return [directory / name]
    raise ValueError(f"{directory}: no weights found (expected one of {WEIGHT_FILES + WEIGHT_INDEX_FILES})")


_READ_ERRORS = (SafetensorError, OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError)


def _load_torch_file(file: Path, mmap: bool = False) -> Dict[str, Any]:
    mmap = mmap and zipfile.is_zipfile(file)  # the legacy (pre-1.6) format cannot be memory-mapped
    try:
        loaded = torch.load(str(file), map_location="cpu", weights_only=True, mmap=mmap)
    except _READ_ERRORS as error:
        raise ValueError(f"{file}: corrupt, unreadable or not a weights-only state dict ({error})") from error
    if not isinstance(loaded, dict):
        raise ValueError(f"{file}: expected a state dict, found {type(loaded).__name__}")
    return loaded


def read_weights_file(file: PathLike, prefix: str = "") -> Dict[str, Any]:
    """The entries of one weights file (safetensors, or a torch pickle read with ``weights_only=True``) whose
    names start with ``prefix``. A corrupt file, or a pickle holding code, raises ``ValueError`` naming it."""
    file = Path(file)
    if file.suffix != ".safetensors":
        return {name: value for name, value in _load_torch_file(file).items() if name.startswith(prefix)}
    try:
        with safe_open(str(file), framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys() if name.startswith(prefix)}
    except _READ_ERRORS as error:
        raise ValueError(f"{file}: corrupt, unreadable or not a weights-only state dict ({error})") from error


def tensor_names(file: PathLike) -> Set[str]:
    """The tensor names of one weights file or ``*.index.json``, without reading the tensors."""
    file = Path(file)
    if file.name.endswith(".index.json"):
        try:
            return set(json.loads(file.read_text(encoding="utf-8"))["weight_map"])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{file}: not a weight index ({type(error).__name__}: {error})") from error
    if file.suffix != ".safetensors":
        return set(_load_torch_file(file, mmap=True))
    try:
        with safe_open(str(file), framework="pt") as handle:
            return set(handle.keys())
    except _READ_ERRORS as error:
        raise ValueError(f"{file}: corrupt or unreadable weights file ({error})") from error


def check_weight_files(directory: PathLike) -> None:
    """Raise ``ValueError`` naming the file when a weight file of ``directory`` is corrupt, or a pickle that is not a
    plain state dict (one that would run code).

    Reads the safetensors headers and the torch pickles' records (memory-mapped; a truncated or damaged file, or a
    pickle payload, fails here, before any model is built).
    """
    for file in _weight_files(Path(directory), ""):
        tensor_names(file)


def read_checkpoint_tensors(directory: PathLike, prefix: str = "") -> Dict[str, torch.Tensor]:
    """The tensors of a Hugging Face checkpoint directory whose names start with ``prefix``.

    Reads a sharded checkpoint through its ``*.index.json`` (only the shards holding such tensors) or a single
    ``model.safetensors`` / ``pytorch_model.bin``; torch files are loaded with ``weights_only=True``. A
    corrupt file raises ``ValueError`` naming it.
    """
    tensors: Dict[str, torch.Tensor] = {}
    for file in _weight_files(Path(directory), prefix):
        tensors.update(read_weights_file(file, prefix))
    return tensors
