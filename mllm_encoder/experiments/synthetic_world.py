"""The synthetic world of the DMU benchmark: a pretraining and a fine-tuning distribution, in ShareGPT4V JSON.

Every image is a plain background in one of four named colours with one disc of another colour near the
centre. Three hidden attributes change global statistics of the whole image, each learnable by a non-linear
function of patch embeddings (an FFN on top of attention) but never positional or tiny:

* ``size``: the disc is ``large`` or ``medium`` (about twice the area), the fraction of disc-coloured patches;
* ``light``: the image is shot in ``bright`` or ``dim`` light (every pixel scaled by 0.7);
* ``grain``: the picture is ``smooth`` or ``grainy`` (per-pixel noise of standard deviation 4 or 18).

Every image also has a nuisance, independent of everything else and named in every caption of both
distributions: a full-width ``band`` under the disc in one of 12 colours. It is not a hidden attribute; it makes
captions and images distinct enough that a batch of one colour pair seldom holds two identical captions (false
negatives for the contrastive loss), as in real caption sets.

The *pretraining* distribution (the base's): half the images carry a frame in one of four colours; the
captions name the background, the disc and the frame, and each hidden attribute only in one caption in four
(so the base knows the words but has less reason to encode the attributes, as CLIP's captions seldom
describe fine details). The *fine-tuning* distribution: no frames; the captions name the background,
the disc and all three hidden attributes. So the fine-tuning data teaches what the base's captions seldom
mention, and the pretraining eval split measures what the base knew (retention).
Everything is deterministic given the seed.
"""

import json
import os
from pathlib import Path
from typing import Any, Dict, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from mllm_encoder.data.generated_split import write_generated_split

PALETTE: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 50, 50),
    "green": (50, 170, 70),
    "blue": (50, 90, 220),
    "yellow": (230, 210, 50),
}
FRAMES: Dict[str, Tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "grey": (128, 128, 128),
    "brown": (120, 75, 35),
}
BANDS: Dict[str, Tuple[int, int, int]] = {
    "orange": (250, 140, 20),
    "purple": (120, 40, 160),
    "pink": (250, 150, 200),
    "cyan": (40, 210, 220),
    "navy": (20, 25, 100),
    "olive": (120, 130, 20),
    "teal": (0, 125, 125),
    "magenta": (210, 30, 170),
    "lime": (170, 240, 60),
    "maroon": (110, 15, 40),
    "beige": (230, 210, 170),
    "violet": (170, 120, 240),
}
SIZES = ("large", "medium")
LIGHTS = ("bright", "dim")
GRAINS = ("smooth", "grainy")
HIDDEN = ("size", "light", "grain")  # the fine-tuning captions' additions, in intended order of salience
FINETUNE_ATTRIBUTES: Dict[str, Sequence[str]] = {
    "background": tuple(PALETTE),
    "disc": tuple(PALETTE),
    "size": SIZES,
    "light": LIGHTS,
    "grain": GRAINS,
    "band": tuple(BANDS),
}
PRETRAIN_ATTRIBUTES: Dict[str, Sequence[str]] = {
    "background": tuple(PALETTE),
    "disc": tuple(PALETTE),
    "band": tuple(BANDS),
    "frame": tuple(FRAMES),
}
FINETUNE_TEMPLATES = (
    "a {size} {disc} disc on a {background} background with {a_band} band, {grain}, in {light} light.",
    "a {grain} photo in {light} light of a {size} {disc} disc on a {background} background with {a_band} band.",
    "{light} light, {grain}: a {size} {disc} disc on a {background} background with {a_band} band.",
)
PRETRAIN_TEMPLATES = (
    "a {disc} disc on a {background} background with {a_band} band",
    "a photo of a {disc} disc on {background} with {a_band} band",
)
FRAME_SUFFIX = " in a {frame} frame"
MENTION_PROBABILITY = 0.25  # of a pretraining caption naming a given hidden attribute
DISTRIBUTIONS = ("pretrain", "finetune")


def sample_world(rng: np.random.Generator, distribution: str) -> Dict[str, Any]:
    """Random attributes of one image of ``distribution`` (``pretrain`` or ``finetune``), with its template."""
    colours = rng.choice(len(PALETTE), size=2, replace=False)
    names = list(PALETTE)
    sample: Dict[str, Any] = {
        "background": names[colours[0]],
        "disc": names[colours[1]],
        "size": SIZES[rng.integers(2)],
        "light": LIGHTS[rng.integers(2)],
        "grain": GRAINS[rng.integers(2)],
        "band": list(BANDS)[rng.integers(len(BANDS))],
        "frame": None,
    }
    if distribution == "pretrain":
        if rng.random() < 0.5:
            sample["frame"] = list(FRAMES)[rng.integers(len(FRAMES))]
        sample["template"] = int(rng.integers(len(PRETRAIN_TEMPLATES)))
        sample["mentions"] = [name for name in HIDDEN if rng.random() < MENTION_PROBABILITY]
    else:
        sample["template"] = int(rng.integers(len(FINETUNE_TEMPLATES)))
    return sample


def caption(sample: Dict[str, Any], distribution: str) -> str:
    """The caption of ``sample`` in the style of ``distribution``."""
    a_band = ("an " if sample["band"][0] in "aeiou" else "a ") + sample["band"]
    if distribution == "finetune":
        return FINETUNE_TEMPLATES[sample["template"]].format(**sample, a_band=a_band)
    mentions = sample.get("mentions", [])
    disc = f"{sample['size']} {sample['disc']}" if "size" in mentions else sample["disc"]
    text = PRETRAIN_TEMPLATES[sample["template"]].format(**{**sample, "disc": disc, "a_band": a_band})
    text += FRAME_SUFFIX.format(frame=sample["frame"]) if sample["frame"] else ""
    text += f", {sample['grain']}" if "grain" in mentions else ""
    text += f", in {sample['light']} light" if "light" in mentions else ""
    return text + "."


def render(sample: Dict[str, Any], rng: np.random.Generator, size: int = 32) -> Image.Image:
    """A ``size`` x ``size`` RGB image of ``sample``."""
    if size < 16:
        raise ValueError(f"image size must be at least 16, got {size}")
    jitter = lambda: rng.uniform(-12, 12, size=3)  # noqa: E731 - colour variation within a name
    image = np.empty((size, size, 3))
    image[:] = np.asarray(PALETTE[sample["background"]]) + jitter()
    image[round(size * 13 / 16) : round(size * 15 / 16)] = np.asarray(BANDS[sample["band"]]) + jitter()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    fraction = rng.uniform(0.34, 0.39) if sample["size"] == "large" else rng.uniform(0.22, 0.26)
    cx, cy = (size - 1) / 2 + rng.uniform(-0.08, 0.08, size=2) * size
    disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= (fraction * size) ** 2
    image[disc] = np.asarray(PALETTE[sample["disc"]]) + jitter()
    if sample.get("frame"):
        width = max(1, round(size / 16))
        border = np.zeros((size, size), dtype=bool)
        border[:width], border[-width:], border[:, :width], border[:, -width:] = True, True, True, True
        image[border] = np.asarray(FRAMES[sample["frame"]]) + jitter()
    if sample["light"] == "dim":
        image *= 0.7
    image += rng.normal(0.0, 18.0 if sample["grain"] == "grainy" else 4.0, size=image.shape)
    return Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8), mode="RGB")


def _write_split(out: Path, name: str, distribution: str, count: int, seed: int, image_size: int, progress: bool):
    rng = np.random.default_rng([seed, DISTRIBUTIONS.index(distribution), 0 if name.endswith("train") else 1])

    def draw():
        sample = sample_world(rng, distribution)
        return render(sample, rng, image_size), caption(sample, distribution), sample

    attributes = FINETUNE_ATTRIBUTES if distribution == "finetune" else PRETRAIN_ATTRIBUTES
    header = {"distribution": distribution, "attributes": {k: list(v) for k, v in attributes.items()}}
    return write_generated_split(out, name, count, draw, header, progress=progress)


def write_world_dataset(
    out_dir: Union[str, os.PathLike],
    num_pretrain: int,
    num_finetune: int,
    num_eval: int,
    image_size: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> Dict[str, str]:
    """Write both distributions: ``{pretrain,finetune}_{train,eval}.json`` (ShareGPT4V) and their attributes.

    Returns the paths keyed ``pretrain_train``, ``pretrain_eval``, ``finetune_train``, ``finetune_eval``, each
    with an ``..._attributes`` twin, and ``image_root`` (``out_dir``, which the image paths are relative to).
    """
    for name, value in (("num_pretrain", num_pretrain), ("num_finetune", num_finetune), ("num_eval", num_eval)):
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"image_root": str(out)}
    counts = {
        "train": {"pretrain": num_pretrain, "finetune": num_finetune},
        "eval": dict.fromkeys(DISTRIBUTIONS, num_eval),
    }
    for distribution in DISTRIBUTIONS:
        for split in ("train", "eval"):
            name = f"{distribution}_{split}"
            paths.update(_write_split(out, name, distribution, counts[split][distribution], seed, image_size, progress))
    return paths


def load_world_attributes(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Read an attributes file written by :func:`write_world_dataset`, checking its shape."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or data.get("distribution") not in DISTRIBUTIONS or "samples" not in data:
        raise ValueError(f"{path}: not a synthetic-world attributes file (needs 'distribution' and 'samples')")
    return data
