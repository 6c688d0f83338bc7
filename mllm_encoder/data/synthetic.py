"""A synthetic fine-grained image-caption set for the CPU demo, written in ShareGPT4V JSON format.

Each image holds one or two objects over a dark or light background with a gradient and noise. An object
has a colour, a shape, a fill texture, a size and a position (image quadrant), and its caption names all
of them. Colour, shape and background are "easy" (large, global signals); texture (2-pixel patterns),
small size and position are "fine" details of the kind CLIP tends to ignore. Everything is deterministic
given the seed; thousands of 64-pixel images are written in seconds.
"""

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from mllm_encoder.data.generated_split import write_generated_split

COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 90, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 210),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond")
TEXTURES = ("solid", "striped", "checkered", "dotted")
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
BACKGROUNDS = ("dark", "light")
OBJECT_ATTRIBUTES: Dict[str, Sequence[str]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "texture": TEXTURES,
    "size": SIZES,
    "position": POSITIONS,
}
ATTRIBUTES: Dict[str, Sequence[str]] = {**OBJECT_ATTRIBUTES, "background": BACKGROUNDS}
ATTRIBUTE_PROMPTS: Dict[str, str] = {
    "colour": "a photo of a {} object.",
    "shape": "a photo of a {}.",
    "texture": "a photo of a {} object.",
    "size": "a photo of a {} object.",
    "position": "a photo of an object in the {}.",
    "background": "a photo of an object on a {} background.",
}
SINGLE_TEMPLATES = (
    "a photo of {0} on a {bg} background.",
    "{0}, on a {bg} background.",
    "one object on a {bg} background: {0}.",
    "a {bg} background with {0}.",
)
PAIR_TEMPLATES = (
    "a photo of {0} and {1} on a {bg} background.",
    "two objects on a {bg} background: {0} and {1}.",
    "{0} and {1}, on a {bg} background.",
    "a {bg} background with {0} and {1}.",
)


def describe_object(obj: Dict[str, str]) -> str:
    """Noun phrase of one object, e.g. ``a small red striped circle in the top left``."""
    return f"a {obj['size']} {obj['colour']} {obj['texture']} {obj['shape']} in the {obj['position']}"


def describe(objects: Sequence[Dict[str, str]], background: str, template: int = 0) -> str:
    """The caption of an image from its attributes with the ``template``-th sentence pattern."""
    templates = SINGLE_TEMPLATES if len(objects) == 1 else PAIR_TEMPLATES
    return templates[template % len(templates)].format(*map(describe_object, objects), bg=background)


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    if shape == "circle":
        return dx**2 + dy**2 <= radius**2
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * radius
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= radius
    inside_rows = (dy >= -radius) & (dy <= 0.8 * radius)  # upward triangle, apex at the top
    return inside_rows & (np.abs(dx) <= (dy + radius) / 1.8)


def _texture_on(texture: str, xx: np.ndarray, yy: np.ndarray, period: int) -> np.ndarray:
    """Pixels drawn in the full colour (the others get a darker shade of it)."""
    half = max(period // 2, 1)
    if texture == "striped":
        return ((xx + yy) // half) % 2 == 0
    if texture == "checkered":
        return ((xx // half) + (yy // half)) % 2 == 0
    if texture == "dotted":
        ox, oy = xx % period - (period - 1) / 2, yy % period - (period - 1) / 2
        return ox**2 + oy**2 > (period / 3.2) ** 2
    return np.ones_like(xx, dtype=bool)


def _background(rng: np.random.Generator, kind: str, size: int, grid: Tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    level = rng.uniform(15, 75) if kind == "dark" else rng.uniform(170, 240)
    tint = rng.uniform(-12, 12, size=3)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * grid[0] + np.sin(angle) * grid[1]) / size - 0.5
    image = level + tint[None, None, :] + rng.uniform(10, 30) * ramp[:, :, None]
    return image + rng.normal(0, 5, size=(size, size, 3))


def _draw_object(image: np.ndarray, obj: Dict[str, str], rng: np.random.Generator, grid) -> None:
    size = image.shape[0]
    quadrant = size / 2
    row, col = divmod(POSITIONS.index(obj["position"]), 2)
    fraction = rng.uniform(0.38, 0.46) if obj["size"] == "large" else rng.uniform(0.16, 0.22)
    radius = fraction * quadrant
    jitter = (quadrant / 2 - radius) * 0.8
    cx = (col + 0.5) * quadrant + rng.uniform(-jitter, jitter)
    cy = (row + 0.5) * quadrant + rng.uniform(-jitter, jitter)
    xx, yy = grid
    mask = _shape_mask(obj["shape"], xx - cx, yy - cy, radius)
    period = max(3, round(size / 16))
    bright = _texture_on(obj["texture"], xx.astype(int), yy.astype(int), period)
    colour = np.asarray(COLOURS[obj["colour"]], dtype=np.float64)
    shade = np.where(bright[:, :, None], colour, 0.45 * colour)
    image[mask] = shade[mask]


def sample_attributes(rng: np.random.Generator, max_objects: int = 2, pair_probability: float = 0.4):
    """Random attributes of one image: ``(objects, background, template)``."""
    count = 2 if max_objects >= 2 and rng.random() < pair_probability else 1
    positions = rng.choice(len(POSITIONS), size=count, replace=False)
    objects = []
    for position in positions:
        obj = {name: str(values[rng.integers(len(values))]) for name, values in OBJECT_ATTRIBUTES.items()}
        obj["position"] = POSITIONS[position]
        objects.append(obj)
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    return objects, background, int(rng.integers(len(SINGLE_TEMPLATES)))


def render_image(objects: Sequence[Dict[str, str]], background: str, rng: np.random.Generator, size: int = 64):
    """A ``size`` x ``size`` RGB PIL image of the objects over a background of the given kind."""
    grid = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64))
    image = _background(rng, background, size, grid)
    for obj in objects:
        _draw_object(image, obj, rng, grid)
    return Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8), mode="RGB")


def _write_split(out_dir: Path, split: str, count: int, seed: int, image_size: int, image_format: str, progress):
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])

    def draw():
        objects, background, template = sample_attributes(rng)
        image = render_image(objects, background, rng, image_size)
        attributes = {"background": background, "objects": objects, "template": template}
        return image, describe(objects, background, template), attributes

    header = {"attributes": {k: list(v) for k, v in ATTRIBUTES.items()}, "prompts": ATTRIBUTE_PROMPTS}
    write_generated_split(out_dir, split, count, draw, header, image_format, progress)


def write_shapes_dataset(
    out_dir: Union[str, os.PathLike],
    num_train: int,
    num_eval: int,
    image_size: int = 64,
    seed: int = 0,
    image_format: str = "png",
    progress: bool = True,
) -> Dict[str, str]:
    """Write the synthetic set: ``train.json``/``eval.json`` (ShareGPT4V), per-sample attributes, images.

    Returns the paths: ``train``, ``eval``, ``train_attributes``, ``eval_attributes`` and ``image_root``
    (the folder the JSON image paths are relative to, which is ``out_dir``).
    """
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16, got {image_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", num_train), ("eval", num_eval)):
        _write_split(out, split, count, seed, image_size, image_format, progress)
    paths = {split: out / f"{split}.json" for split in ("train", "eval")}
    paths.update({f"{split}_attributes": out / f"{split}_attributes.json" for split in ("train", "eval")})
    return {**{key: str(path) for key, path in paths.items()}, "image_root": str(out)}


def load_attributes(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Read an attributes file written by ``write_shapes_dataset``, checking its shape."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("samples"), list) or "attributes" not in data:
        raise ValueError(f"{path}: not a synthetic attributes file (needs 'attributes' and 'samples')")
    return data


def sample_caption(sample: Dict[str, Any]) -> str:
    """The caption of a sample of the attributes file (its objects, background and template)."""
    return describe(sample["objects"], sample["background"], sample.get("template", 0))


def set_object_attribute(sample: Dict[str, Any], attribute: str, value: str) -> Dict[str, Any]:
    """A copy of ``sample`` with ``attribute`` of its first object (or the background) set to ``value``: what a
    caption swap changes (:func:`mllm_encoder.eval.caption_swap.swapped_captions` with ``assign=`` this)."""
    if attribute == "background":
        return {**sample, "background": value}
    return {**sample, "objects": [dict(sample["objects"][0], **{attribute: value}), *sample["objects"][1:]]}


def single_object_labels(data: Dict[str, Any], attribute: str) -> List[Tuple[int, str]]:
    """``(sample index, value)`` of ``attribute`` for every sample where it is unambiguous."""
    labels = []
    for sample in data["samples"]:
        if attribute == "background":
            labels.append((sample["index"], sample["background"]))
        elif len(sample["objects"]) == 1:
            labels.append((sample["index"], sample["objects"][0][attribute]))
    return labels
