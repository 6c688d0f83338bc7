"""transformers' LLaVA-NeXT and LLaVA-OneVision (anyres tiles) with a CLIP-MoE vision tower.

Both models build their tower from ``vision_config`` through the Auto classes (``import mllm_encoder`` registers
``clip_moe_vision_model``), cut each image into ``image_size`` tiles on a grid chosen from
``image_grid_pinpoints`` plus one downscaled base image, run the tower on all tiles as one batch and pack the
patch features. The tile grid depends only on the tower's ``image_size``/``patch_size`` and the pinpoints, so a
fixed-resolution CLIP-MoE tower works unchanged. :func:`build_anyres_llava` assembles such a model from a
CLIP-MoE checkpoint and a causal LM, with the matching processor; the result saves and reloads with
``from_pretrained``. transformers adds no MoE load-balancing loss: ``llava_patch.aux_loss.TowerAuxLoss`` adds it
when the tower is trained. LLaVA-NeXT needs transformers >= 4.39 and OneVision >= 4.45.
"""

from typing import Any, List, Optional, Tuple

import transformers
from transformers import CLIPImageProcessor, PreTrainedModel

from llava_patch.hf.llava import load_llava_parts
from mllm_encoder.atomic import PathLike
from mllm_encoder.families import FAMILIES

# kind -> (config, model, image processor, processor) class names in transformers
KINDS = {
    "llava_next": (
        "LlavaNextConfig",
        "LlavaNextForConditionalGeneration",
        "LlavaNextImageProcessor",
        "LlavaNextProcessor",
    ),
    "llava_onevision": (
        "LlavaOnevisionConfig",
        "LlavaOnevisionForConditionalGeneration",
        "LlavaOnevisionImageProcessor",
        "LlavaOnevisionProcessor",
    ),
}
MIN_TRANSFORMERS = {"llava_next": "4.39", "llava_onevision": "4.45"}
# LLaVA-NeXT's grid (in tiles): 1x2, 2x1, 2x2, 3x1, 1x3; OneVision's anyres_max_9 grid: every (rows, cols) up to 6x6.
NEXT_GRID = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))
ONEVISION_GRID = tuple((rows, cols) for rows in range(1, 7) for cols in range(1, 7))
# The image towers these builds take (the processors count one class token per tile): Family.llava.anyres.
ANYRES_TOWERS = [family.vision_model for family in FAMILIES.values() if family.llava and family.llava.anyres]


def anyres_classes(kind: str) -> Tuple[Any, Any, Any, Any]:
    """(config, model, image processor, processor) classes of ``kind`` (``llava_next`` or ``llava_onevision``).

    Raises:
        ValueError: for an unknown kind, or when the installed transformers lacks the classes.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    missing = [name for name in KINDS[kind] if not hasattr(transformers, name)]
    if missing:
        raise ValueError(
            f"transformers {transformers.__version__} has no {', '.join(missing)}; "
            f"{kind} needs transformers >= {MIN_TRANSFORMERS[kind]}"
        )
    return tuple(getattr(transformers, name) for name in KINDS[kind])


def anyres_grid_pinpoints(image_size: int, kind: str = "llava_next") -> List[List[int]]:
    """``image_grid_pinpoints`` in pixels for a tower of ``image_size``: LLaVA-NeXT's or OneVision's tile grid."""
    grid = NEXT_GRID if kind == "llava_next" else ONEVISION_GRID
    return [[rows * image_size, cols * image_size] for rows, cols in grid]


def build_anyres_image_processor(
    clip_processor: CLIPImageProcessor, image_size: int, kind: str, image_grid_pinpoints: List[List[int]]
):
    """The ``kind`` image processor with the CLIP-MoE processor's normalisation and the tower's tile size."""
    image_processor_class = anyres_classes(kind)[2]
    common = dict(
        image_mean=clip_processor.image_mean,
        image_std=clip_processor.image_std,
        image_grid_pinpoints=image_grid_pinpoints,
        do_convert_rgb=True,
    )
    if kind == "llava_next":
        return image_processor_class(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}, **common
        )
    return image_processor_class(size={"height": image_size, "width": image_size}, **common)


def build_anyres_processor(
    image_processor, tokenizer, vision_config, kind: str, select_strategy: str, image_token: str
):
    """The ``kind`` processor: it expands each image token into as many tokens as the model packs features."""
    processor_class = anyres_classes(kind)[3]
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    if kind == "llava_next":
        return processor_class(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=vision_config.patch_size,
            vision_feature_select_strategy=select_strategy,
            image_token=image_token,
            num_additional_image_tokens=1,  # the CLS token the tower returns
        )
    video_processor = transformers.LlavaOnevisionVideoProcessor(
        image_mean=image_processor.image_mean,
        image_std=image_processor.image_std,
        size={"height": vision_config.image_size, "width": vision_config.image_size},
    )
    return processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        num_image_tokens=patches + 1,  # tower outputs per tile, CLS included
        vision_feature_select_strategy=select_strategy,
        image_token=image_token,
    )


def build_anyres_llava(
    clip_moe_dir: PathLike,
    llm_dir: PathLike,
    kind: str = "llava_next",
    vision_feature_layer: int = -2,
    vision_feature_select_strategy: str = "default",
    image_grid_pinpoints: Optional[List[List[int]]] = None,
    image_token: str = "<image>",
    projector_hidden_act: str = "gelu",
    trust_remote_code: bool = False,
) -> Tuple[PreTrainedModel, Any]:
    """A LLaVA-NeXT or LLaVA-OneVision model with the CLIP-MoE tower of ``clip_moe_dir`` and the LM of ``llm_dir``.

    ``vision_feature_layer=-2`` with the ``"default"`` strategy (CLS dropped) is LLaVA-1.5/NeXT's choice for CLIP
    towers. ``image_grid_pinpoints`` defaults to :func:`anyres_grid_pinpoints` of ``kind`` for the tower's
    ``image_size``. ``image_token`` (and ``<video>`` for OneVision) is added to the tokenizer when missing. The
    projector and ``image_newline`` start random: train them as in LLaVA's stage 1. The CLIP-MoE checkpoint is
    loaded strictly; the LM folder runs no code of its own unless ``trust_remote_code=True``.

    Returns:
        The model and its processor (tokenizer + anyres image processor); save both to one directory.
    """
    if vision_feature_select_strategy not in ("default", "full"):
        raise ValueError(
            f"vision_feature_select_strategy must be 'default' or 'full', got {vision_feature_select_strategy!r}"
        )
    config_class, model_class, _, _ = anyres_classes(kind)
    special = [image_token] + (["<video>"] if kind == "llava_onevision" else [])
    parts = load_llava_parts(clip_moe_dir, llm_dir, special, trust_remote_code, towers=ANYRES_TOWERS)
    vision, tokenizer = parts.vision, parts.tokenizer
    image_size = vision.config.image_size
    pinpoints = image_grid_pinpoints or anyres_grid_pinpoints(image_size, kind)
    token_ids = dict(image_token_index=tokenizer.convert_tokens_to_ids(image_token))
    if kind == "llava_onevision":
        token_ids["video_token_index"] = tokenizer.convert_tokens_to_ids("<video>")
    model = parts.assemble(
        config_class,
        model_class,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
        image_grid_pinpoints=pinpoints,
        projector_hidden_act=projector_hidden_act,
        **token_ids,
    )
    clip_processor = CLIPImageProcessor.from_pretrained(str(clip_moe_dir))
    image_processor = build_anyres_image_processor(clip_processor, image_size, kind, pinpoints)
    processor = build_anyres_processor(
        image_processor, tokenizer, vision.config, kind, vision_feature_select_strategy, image_token
    )
    return model, processor
