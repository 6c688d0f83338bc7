"""The one evaluator of the synthetic worlds: retrieval, caption swaps and linear probes of one checkpoint.

Images and captions are preprocessed once, with the base's processors (:class:`WorldEvaluator`); each model then
costs only its forward passes. A world is described by its tests (:class:`RetrievalTest`, :class:`SwapTest`,
:class:`ProbeTest`); :func:`demo_world_evaluator` and :func:`marker_world_evaluator` describe the two worlds.
Metrics, in percent.

The demo's world (:mod:`.synthetic_world`):

* ``i2t_r1``, ``t2i_r1``: retrieval on the fine-tuning distribution's eval split;
* ``swap_{attribute}``: caption-swap accuracy on that split for each hidden attribute (those the base's
  captions never name), and ``swap_hidden``, their mean;
* ``probe_{attribute}``, ``probe_hidden``: linear probes on the image embeddings for the hidden attributes
  (fitted on a fixed subset of the fine-tuning training split, tested on the eval split);
* ``retain_i2t_r1``, ``retain_t2i_r1``, ``retain_swap_frame``: the same on the *pretraining* eval split with
  the base's own captions (frame: images that have one), the retention of what the base knew.

The control's marker world (:mod:`.marker_world`): ``i2t_r1``, ``t2i_r1``, ``swap_size`` and ``probe_size`` on
the held-out pairs (the probe fitted on the first training images).
"""

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

import torch
from PIL import Image

from mllm_encoder.atomic import PathLike
from mllm_encoder.data.dataset import build_transforms
from mllm_encoder.dmu.resources import processors
from mllm_encoder.encode import encode_images, encode_tokens, eval_mode
from mllm_encoder.eval.caption_swap import caption_swap_accuracy, swapped_captions
from mllm_encoder.eval.linear_probe import linear_probe_accuracy
from mllm_encoder.eval.retrieval import retrieval_metrics
from mllm_encoder.eval.router_analysis import expert_load
from mllm_encoder.experiments.marker_world import ATTRIBUTES, load_marker_samples, marker_caption
from mllm_encoder.experiments.synthetic_world import (
    FINETUNE_ATTRIBUTES,
    HIDDEN,
    PRETRAIN_ATTRIBUTES,
    caption,
    load_world_attributes,
)

Sample = Dict[str, Any]
Caption = Callable[[Sample], str]


@dataclass(frozen=True)
class RetrievalTest:
    """R@1 both ways between the images of ``split`` and their captions (``caption`` of each sample)."""

    split: str
    caption: Caption


@dataclass(frozen=True)
class SwapTest:
    """Caption-swap accuracy on the samples of ``split`` that have ``attribute``: each image against its caption
    with the attribute set to each of ``values`` (ties are misses, :func:`caption_swap_accuracy`)."""

    split: str
    attribute: str
    values: Sequence[str]
    caption: Caption


@dataclass(frozen=True)
class ProbeTest:
    """A linear probe of ``attribute`` (one class per value) on the image embeddings, fitted on ``train``,
    scored on ``test``."""

    attribute: str
    values: Sequence[str]
    train: str
    test: str


class _SwapOptions:
    """The tokenised options of one swap test: ``V`` captions per sample, the true one's index, the image rows."""

    def __init__(self, samples: Sequence[Sample], test: SwapTest, text_tokenizer) -> None:
        self.samples = [sample for sample in samples if sample.get(test.attribute) is not None]
        self.num_values = len(test.values)
        self.captions = [
            text for s in self.samples for text in swapped_captions(s, test.attribute, test.values, test.caption)
        ]
        self.labels = torch.tensor([list(test.values).index(s[test.attribute]) for s in self.samples])
        self.rows = torch.tensor([s["index"] for s in self.samples])
        self.tokens = text_tokenizer(self.captions)


class WorldEvaluator:
    """Every metric of a model on one synthetic world, from its samples and the base's processors.

    ``samples``: ``{split: [sample]}`` (a sample's ``index`` is its row in the split, its ``image`` relative to
    ``image_root``); ``retrieval`` is keyed by the prefix of its two metrics (``""``: ``i2t_r1``, ``t2i_r1``);
    ``means``: ``{name: [metric]}``, each added once all its metrics are. Metrics come in the order retrieval,
    swaps, probes (each followed by the means it completes).
    """

    def __init__(
        self,
        image_root: PathLike,
        samples: Dict[str, List[Sample]],
        processors_dir: PathLike,
        retrieval: Dict[str, RetrievalTest],
        swaps: Dict[str, SwapTest],
        probes: Dict[str, ProbeTest],
        means: Dict[str, Sequence[str]],
        batch_size: int = 256,
    ) -> None:
        image_processor, tokenizer = processors(processors_dir)
        self.transform, self.text_tokenizer = build_transforms(image_processor, tokenizer)
        self.batch_size = batch_size
        self.samples = samples
        self.retrieval, self.probes, self.means = retrieval, probes, means
        self.pixels = {
            split: self._load_images(Path(image_root), split_samples) for split, split_samples in samples.items()
        }
        self.tokens = {
            prefix: self.text_tokenizer([test.caption(s) for s in samples[test.split]])
            for prefix, test in retrieval.items()
        }
        self.swaps = swaps
        self.options = {
            name: _SwapOptions(samples[test.split], test, self.text_tokenizer) for name, test in swaps.items()
        }

    def _load_images(self, root: Path, samples: List[Sample]) -> torch.Tensor:
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

    def _labels(self, split: str, probe: ProbeTest) -> torch.Tensor:
        values = list(probe.values)
        return torch.tensor([values.index(sample[probe.attribute]) for sample in self.samples[split]])

    def _add_means(self, metrics: Dict[str, float]) -> None:
        for name, members in self.means.items():
            if name not in metrics and all(member in metrics for member in members):
                metrics[name] = sum(metrics[member] for member in members) / len(members)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> Dict[str, float]:
        """All metrics of ``model`` (percent), keyed as in the module docstring."""
        metrics: Dict[str, float] = {}
        with eval_mode(model):
            images = {split: self._images(model, split) for split in self.pixels}
            for prefix, test in self.retrieval.items():
                split_images = images[test.split]
                texts = self._texts(model, self.tokens[prefix])
                ranks = retrieval_metrics(split_images, texts, torch.arange(len(split_images)), ks=(1,))
                metrics[f"{prefix}i2t_r1"], metrics[f"{prefix}t2i_r1"] = ranks["i2t_r1"], ranks["t2i_r1"]
            for name, options in self.options.items():
                texts = self._texts(model, options.tokens).view(len(options.samples), options.num_values, -1)
                split_images = images[self.swaps[name].split][options.rows]
                metrics[name] = caption_swap_accuracy(split_images, texts, options.labels)
            self._add_means(metrics)
            for name, probe in self.probes.items():
                metrics[name] = linear_probe_accuracy(
                    images[probe.train],
                    self._labels(probe.train, probe),
                    images[probe.test],
                    self._labels(probe.test, probe),
                    num_classes=len(probe.values),
                )
            self._add_means(metrics)
        return metrics

    def expert_load(self, model: torch.nn.Module) -> Dict[str, Dict[str, Any]]:
        """Router load per tower and layer (:func:`expert_load`) on each retrieval split: ``{split: load}``."""
        loads = {}
        for prefix, test in self.retrieval.items():
            pixels, tokens = self.pixels[test.split], self.tokens[prefix]
            batches = [
                {
                    "pixel_values": pixels[i : i + self.batch_size],
                    **{k: v[i : i + self.batch_size] for k, v in tokens.items()},
                }
                for i in range(0, len(pixels), self.batch_size)
            ]
            loads[test.split] = expert_load(model, batches, progress=False)
        return loads


def demo_world_evaluator(paths: Dict[str, str], processors_dir: PathLike, probe_train: int) -> WorldEvaluator:
    """The demo benchmark's evaluator (:func:`~.synthetic_world.write_world_dataset`'s ``paths``)."""
    splits = ("finetune_eval", "pretrain_eval", "finetune_train")
    samples = {split: load_world_attributes(paths[f"{split}_attributes"])["samples"] for split in splits}
    samples["finetune_train"] = samples["finetune_train"][:probe_train]
    finetune = functools.partial(caption, distribution="finetune")
    pretrain = functools.partial(caption, distribution="pretrain")
    swaps = {f"swap_{a}": SwapTest("finetune_eval", a, FINETUNE_ATTRIBUTES[a], finetune) for a in HIDDEN}
    swaps["retain_swap_frame"] = SwapTest("pretrain_eval", "frame", PRETRAIN_ATTRIBUTES["frame"], pretrain)
    return WorldEvaluator(
        paths["image_root"],
        samples,
        processors_dir,
        retrieval={"": RetrievalTest("finetune_eval", finetune), "retain_": RetrievalTest("pretrain_eval", pretrain)},
        swaps=swaps,
        probes={f"probe_{a}": ProbeTest(a, FINETUNE_ATTRIBUTES[a], "finetune_train", "finetune_eval") for a in HIDDEN},
        means={"swap_hidden": [f"swap_{a}" for a in HIDDEN], "probe_hidden": [f"probe_{a}" for a in HIDDEN]},
    )


def marker_world_evaluator(paths: Dict[str, str], processors_dir: PathLike, probe_train: int) -> WorldEvaluator:
    """The control's evaluator on a marker world (:func:`~.marker_world.write_marker_world`'s ``paths``)."""
    samples = {split: load_marker_samples(paths[f"{split}_attributes"]) for split in ("train", "eval")}
    samples["train"] = samples["train"][:probe_train]
    return WorldEvaluator(
        paths["image_root"],
        samples,
        processors_dir,
        retrieval={"": RetrievalTest("eval", marker_caption)},
        swaps={"swap_size": SwapTest("eval", "size", ATTRIBUTES["size"], marker_caption)},
        probes={"probe_size": ProbeTest("size", ATTRIBUTES["size"], "train", "eval")},
        means={},
    )
