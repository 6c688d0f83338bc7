"""Writing one split of a generated image-caption set: images, ShareGPT4V conversations, per-sample attributes.

The synthetic sets (:mod:`~mllm_encoder.data.synthetic`, :mod:`~mllm_encoder.experiments.synthetic_world`,
:mod:`~mllm_encoder.experiments.marker_world`) differ in what they draw; this module writes what they draw, the one
way: ``{name}.json`` (ShareGPT4V, the image paths relative to ``out``), ``{name}_attributes.json``
(``header`` plus one record per sample: ``index``, ``image``, ``caption`` and the sample's attributes) and the
images under ``out/images/{name}/``.
"""

from pathlib import Path
from typing import Any, Callable, Dict, Tuple

from PIL import Image
from tqdm.auto import tqdm

from mllm_encoder.atomic import atomic_write_json

PROMPT = "<image>\nDescribe the image in detail."
Draw = Callable[[], Tuple[Image.Image, str, Dict[str, Any]]]


def write_generated_split(
    out: Path, name: str, count: int, draw: Draw, header: Dict[str, Any], image_format: str = "png", progress=True
) -> Dict[str, str]:
    """Write ``count`` samples, each from ``draw() -> (image, caption, attributes)``, in the order drawn.

    Returns the paths keyed ``name`` and ``{name}_attributes``.
    """
    (out / "images" / name).mkdir(parents=True, exist_ok=True)
    save_options = {"compress_level": 1} if image_format == "png" else {"quality": 95}
    conversations, samples = [], []
    for index in tqdm(range(count), desc=name, disable=not progress, leave=False):
        image, caption, attributes = draw()
        relative = f"images/{name}/{index:06d}.{image_format}"
        image.save(out / relative, **save_options)
        turns = [{"from": "human", "value": PROMPT}, {"from": "gpt", "value": caption}]
        conversations.append({"id": f"{name}_{index:06d}", "image": relative, "conversations": turns})
        samples.append({"index": index, "image": relative, "caption": caption, **attributes})
    atomic_write_json(out / f"{name}.json", conversations)
    atomic_write_json(out / f"{name}_attributes.json", {**header, "samples": samples})
    return {name: str(out / f"{name}.json"), f"{name}_attributes": str(out / f"{name}_attributes.json")}
