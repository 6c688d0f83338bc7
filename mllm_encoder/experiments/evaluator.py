"""The demo benchmark's metrics of one checkpoint on the synthetic world (:mod:`.synthetic_world`).

Images and captions are preprocessed once (:class:`WorldEvaluator`); each model then costs only its forward
passes. Metrics, in percent:

* ``i2t_r1``, ``t2i_r1``: retrieval on the fine-tuning distribution's eval split;
* ``swap_{attribute}``: caption-swap accuracy on that split for each hidden attribute (those the base's
  captions never name), and ``swap_hidden``, their mean;
* ``probe_{attribute}``, ``probe_hidden``: linear probes on the image embeddings for the hidden attributes
  (fitted on a fixed subset of the fine-tuning training split, tested on the eval split);
* ``retain_i2t_r1``, ``retain_t2i_r1``, ``retain_swap_frame``: the same on the *pretraining* eval split with
  the base's own captions (frame: images that have one), the retention of what the base knew.
"""

from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch
from PIL import Image

from mllm_encoder.atomic import PathLike
from mllm_encoder.data.dataset import build_transforms
from mllm_encoder.dmu.resources import processors
from mllm_encoder.encode import encode_images, encode_tokens, eval_mode
from mllm_encoder.eval.caption_swap import caption_swap_accuracy
from mllm_encoder.eval.linear_probe import linear_probe_accuracy
from mllm_encoder.eval.retrieval import retrieval_metrics
from mllm_encoder.eval.router_analysis import expert_load
from mllm_encoder.experiments.synthetic_world import (
    FINETUNE_ATTRIBUTES,
    HIDDEN,
    PRETRAIN_ATTRIBUTES,
    caption,
    load_world_attributes,
    swapped_captions,
)


class _Options:
    """Tokenised caption options of one swap test: ``V`` captions per sample, and the true one's index."""

    def __init__(self, samples: Sequence[Dict[str, Any]], attribute: str, values: Sequence[str], distribution: str):
        self.samples = [sample for sample in samples if sample.get(attribute) is not None]
        self.num_values = len(values)
        self.captions = [text for s in self.samples for text in swapped_captions(s, attribute, distribution)]
        self.labels = torch.tensor([list(values).index(s[attribute]) for s in self.samples])
        self.rows = torch.tensor([s["index"] for s in self.samples])


class Encoder:
    """Preprocessed images and tokenised captions (the base's processors), and their embeddings by a model."""

    def __init__(self, processors_dir: PathLike, batch_size: int = 256):
        image_processor, tokenizer = processors(processors_dir)
        self.transform, self.text_tokenizer = build_transforms(image_processor, tokenizer)
        self.batch_size = batch_size
        self.pixels: Dict[str, torch.Tensor] = {}

    def _load_images(self, root: Path, samples: List[Dict[str, Any]]) -> torch.Tensor:
        images = []
        for sample in samples:
            with Image.open(root / sample["image"]) as image:
                images.append(self.transform(image.convert("RGB")))
        return torch.stack(images)

    def _images(self, model, split: str) -> torch.Tensor:
        pixels = self.pixels[split]
        batches = ({"pixel_values": pixels[i : i + self.batch_size]} for i in range(0, len(pixels), self.batch_size))
        return encode_images(model, batches, progress=False)

    def _texts(self, model, tokens: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Normalised text embeddings; each chunk is cut after its longest caption (padding changes nothing)."""
        return encode_tokens(model, tokens, 4 * self.batch_size)


class WorldEvaluator(Encoder):
    """Every benchmark metric of a model, from the world's files and the base's processors."""

    def __init__(self, paths: Dict[str, str], processors_dir: PathLike, probe_train: int, batch_size: int = 256):
        super().__init__(processors_dir, batch_size)
        root = Path(paths["image_root"])
        self.data = {
            split: load_world_attributes(paths[f"{split}_attributes"])
            for split in ("finetune_eval", "pretrain_eval", "finetune_train")
        }
        self.data["finetune_train"]["samples"] = self.data["finetune_train"]["samples"][:probe_train]
        self.pixels = {split: self._load_images(root, data["samples"]) for split, data in self.data.items()}
        self.tokens = {
            split: self.text_tokenizer(
                [caption(s, self.data[split]["distribution"]) for s in self.data[split]["samples"]]
            )
            for split in ("finetune_eval", "pretrain_eval")
        }
        finetune, pretrain = self.data["finetune_eval"]["samples"], self.data["pretrain_eval"]["samples"]
        self.options = {f"swap_{a}": _Options(finetune, a, FINETUNE_ATTRIBUTES[a], "finetune") for a in HIDDEN}
        self.options["retain_swap_frame"] = _Options(pretrain, "frame", PRETRAIN_ATTRIBUTES["frame"], "pretrain")
        self.option_tokens = {name: self.text_tokenizer(options.captions) for name, options in self.options.items()}

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> Dict[str, float]:
        """All metrics of ``model`` (percent), keyed as in the module docstring."""
        metrics: Dict[str, float] = {}
        with eval_mode(model):
            images = {split: self._images(model, split) for split in self.pixels}
            for split, prefix in (("finetune_eval", ""), ("pretrain_eval", "retain_")):
                ranks = retrieval_metrics(
                    images[split], self._texts(model, self.tokens[split]), torch.arange(len(images[split])), ks=(1,)
                )
                metrics[f"{prefix}i2t_r1"], metrics[f"{prefix}t2i_r1"] = ranks["i2t_r1"], ranks["t2i_r1"]
            for name, options in self.options.items():
                split = "pretrain_eval" if name.startswith("retain_") else "finetune_eval"
                texts = self._texts(model, self.option_tokens[name]).view(len(options.samples), options.num_values, -1)
                metrics[name] = caption_swap_accuracy(images[split][options.rows], texts, options.labels)
            metrics["swap_hidden"] = sum(metrics[f"swap_{a}"] for a in HIDDEN) / len(HIDDEN)
            for attribute in HIDDEN:
                metrics[f"probe_{attribute}"] = linear_probe_accuracy(
                    images["finetune_train"],
                    self._labels("finetune_train", attribute),
                    images["finetune_eval"],
                    self._labels("finetune_eval", attribute),
                    num_classes=len(FINETUNE_ATTRIBUTES[attribute]),
                )
            metrics["probe_hidden"] = sum(metrics[f"probe_{a}"] for a in HIDDEN) / len(HIDDEN)
        return metrics

    def _labels(self, split: str, attribute: str) -> torch.Tensor:
        values = list(FINETUNE_ATTRIBUTES[attribute])
        return torch.tensor([values.index(sample[attribute]) for sample in self.data[split]["samples"]])

    def expert_load(self, model: torch.nn.Module) -> Dict[str, Dict[str, Any]]:
        """Router load per tower and layer (:func:`expert_load`) on each eval split: ``{split: load}``."""
        loads = {}
        for split in ("finetune_eval", "pretrain_eval"):
            pixels, tokens = self.pixels[split], self.tokens[split]
            batches = [
                {
                    "pixel_values": pixels[i : i + self.batch_size],
                    **{k: v[i : i + self.batch_size] for k, v in tokens.items()},
                }
                for i in range(0, len(pixels), self.batch_size)
            ]
            loads[split] = expert_load(model, batches, progress=False)
        return loads
