"""The audit's world for the DMU control replication (``docs/dmu.md``, "Control replication"), in ShareGPT4V JSON.

Every image is a plain background in one of 10 named colours with a ``large`` or ``medium`` disc of another of
them near the centre and one 8 x 8-pixel square marker in one of 4 colours at a random position; the caption
names all of them. With 90 colour pairs a random batch seldom holds two images that only the disc's size tells
apart, so a CLIP trained on these captions has little reason to encode the size: the suppressed attribute.
An optional *pretraining* split draws more images from the same generator with captions that name the size
only with a given probability (never: the "suppressed-size" control world; seldom: the "seldom-named" one).
Everything is deterministic given the seed.
"""

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
from PIL import Image

from mllm_encoder.data.generated_split import write_generated_split
from mllm_encoder.experiments.synthetic_world import BANDS, FRAMES, PALETTE, SIZES

COLOURS = {**PALETTE, **dict(list(BANDS.items())[:6])}  # red ... yellow, orange, purple, pink, cyan, navy, olive
MARKERS = FRAMES  # white, black, grey, brown
MARKER_PIXELS = 8
ATTRIBUTES = {"background": tuple(COLOURS), "disc": tuple(COLOURS), "size": SIZES, "marker": tuple(MARKERS)}
TEMPLATE = "a {size} {disc} disc on a {background} background with a {marker} marker."
TEMPLATE_WITHOUT_SIZE = "a {disc} disc on a {background} background with a {marker} marker."
SPLITS = ("train", "eval", "pretrain")  # the index of a split is its random stream
MENTION_STREAM = len(SPLITS)  # the random stream of the pretraining captions' size mentions


def sample_marker_world(rng: np.random.Generator) -> Dict[str, Any]:
    """Random attributes of one image."""
    names = list(COLOURS)
    background, disc = rng.choice(len(names), size=2, replace=False)
    return {
        "background": names[background],
        "disc": names[disc],
        "size": SIZES[rng.integers(len(SIZES))],
        "marker": list(MARKERS)[rng.integers(len(MARKERS))],
    }


def marker_caption(sample: Dict[str, Any], with_size: bool = True) -> str:
    """The caption of ``sample`` (``with_size=False``: the pretraining split's, which omits the disc's size)."""
    return (TEMPLATE if with_size else TEMPLATE_WITHOUT_SIZE).format(**sample)


def render_marker_world(sample: Dict[str, Any], rng: np.random.Generator, size: int = 48) -> Image.Image:
    """A ``size`` x ``size`` RGB image of ``sample``."""
    if size < 2 * MARKER_PIXELS:
        raise ValueError(f"image size must be at least {2 * MARKER_PIXELS}, got {size}")
    jitter = lambda: rng.uniform(-12, 12, size=3)  # noqa: E731 - colour variation within a name
    image = np.empty((size, size, 3))
    image[:] = np.asarray(COLOURS[sample["background"]]) + jitter()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    fraction = rng.uniform(0.34, 0.39) if sample["size"] == "large" else rng.uniform(0.22, 0.26)
    cx, cy = (size - 1) / 2 + rng.uniform(-0.08, 0.08, size=2) * size
    image[(xx - cx) ** 2 + (yy - cy) ** 2 <= (fraction * size) ** 2] = np.asarray(COLOURS[sample["disc"]]) + jitter()
    top, left = rng.integers(0, size - MARKER_PIXELS + 1, size=2)
    image[top : top + MARKER_PIXELS, left : left + MARKER_PIXELS] = np.asarray(MARKERS[sample["marker"]]) + jitter()
    image += rng.normal(0.0, 4.0, size=image.shape)
    return Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8), mode="RGB")


def write_marker_split(
    out_dir: Union[str, os.PathLike],
    split: str,
    count: int,
    image_size: int = 48,
    seed: int = 0,
    size_mention: float = 1.0,
    name: Optional[str] = None,
) -> Dict[str, str]:
    """Write ``count`` samples of ``split``'s random stream as ``{name}.json`` and ``{name}_attributes.json``
    (``name`` defaults to ``split``); each caption names the size with probability ``size_mention``.

    The coin of each caption comes from a stream of its own, so the images are the same for every
    ``size_mention``. Returns the paths keyed ``name`` and ``{name}_attributes``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if count < 1:
        raise ValueError(f"count of {split!r} must be positive, got {count}")
    if not 0.0 <= size_mention <= 1.0:
        raise ValueError(f"size_mention must be in [0, 1], got {size_mention}")
    rng, coins = np.random.default_rng([seed, SPLITS.index(split)]), np.random.default_rng([seed, MENTION_STREAM])

    def draw():
        sample = sample_marker_world(rng)
        with_size = size_mention == 1.0 or (size_mention > 0.0 and coins.random() < size_mention)
        return render_marker_world(sample, rng, image_size), marker_caption(sample, with_size), sample

    header = {"attributes": {k: list(v) for k, v in ATTRIBUTES.items()}, "size_mention": size_mention}
    return write_generated_split(Path(out_dir), name or split, count, draw, header)


def write_marker_world(
    out_dir: Union[str, os.PathLike], num_train: int, num_eval: int, image_size: int = 48, seed: int = 0
) -> Dict[str, str]:
    """Write ``{train,eval}.json`` (ShareGPT4V), ``{train,eval}_attributes.json`` and the images, every caption
    naming the size (a pretraining split: :func:`write_marker_split` with ``split="pretrain"``).

    Returns the paths keyed by split and ``{split}_attributes``, and ``image_root`` (``out_dir``, which the
    image paths are relative to).
    """
    for name, value in (("num_train", num_train), ("num_eval", num_eval)):
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    paths = {"image_root": str(Path(out_dir))}
    paths.update(write_marker_split(out_dir, "train", num_train, image_size, seed))
    paths.update(write_marker_split(out_dir, "eval", num_eval, image_size, seed))
    return paths


def load_marker_samples(path: Union[str, os.PathLike]) -> List[Dict[str, Any]]:
    """The per-sample attributes of a ``{split}_attributes.json`` written by :func:`write_marker_split`."""
    return json.loads(Path(path).read_text(encoding="utf-8"))["samples"]
