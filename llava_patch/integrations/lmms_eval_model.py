"""The lmms-eval model ``clip_moe_llava``: CLIP-MoE LLaVA checkpoints under lmms-eval's tasks.

It answers with either kind of checkpoint, chosen by its ``config.json``:

* a LLaVA-1.5 checkpoint trained with this project (``mm_vision_tower`` in the config): loaded with LLaVA's
  ``load_pretrained_model`` after :func:`llava_patch.apply`, prompted as LLaVA-1.5's ``model_vqa_loader``
  (``vicuna_v1``, one image per request);
* a transformers ``llava`` / ``llava_next`` / ``llava_onevision`` checkpoint with a CLIP-MoE tower
  (:mod:`llava_patch.hf.llava`, :mod:`llava_patch.hf.llava_next`): loaded with its class and ``AutoProcessor``,
  prompted with the processor's chat template, or LLaVA-1.5's ``vicuna_v1`` prompt when it has none.

lmms-eval (0.7.x) finds the class through this package's ``lmms_eval.models`` entry point, whose payload is
:func:`manifests`. lmms-eval is an optional extra (``pip install "mllm-encoder[lmms-eval]"``); nothing else in
the project imports this module. Requests are answered ``batch_size`` at a time (consecutive requests with the same
generation settings, left-padded, greedy answers equal to batch size 1's) in one process.
"""

import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import transformers
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from PIL import Image
from tqdm import tqdm

import mllm_encoder  # noqa: F401  (registers the CLIP-MoE tower with transformers' Auto classes)
from llava_patch.integrations.answerer import LlavaAnswerer
from mllm_encoder.checkpoint import read_config_dict

logger = logging.getLogger(__name__)

MODEL_ID = "clip_moe_llava"
HF_MODEL_CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
}
VICUNA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def manifests() -> List[ModelManifest]:
    """The payload of the ``lmms_eval.models`` entry point: ``clip_moe_llava`` -> :class:`CLIPMoELlava`."""
    return [ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.CLIPMoELlava")]


def generation_settings(gen_kwargs: Dict[str, Any]) -> Tuple[Dict[str, Any], List[str]]:
    """transformers ``generate`` arguments and the stop strings of one lmms-eval request (greedy by default)."""
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    settings: Dict[str, Any] = dict(
        max_new_tokens=int(gen_kwargs.get("max_new_tokens", 128)),
        num_beams=int(gen_kwargs.get("num_beams") or 1),
        do_sample=bool(gen_kwargs.get("do_sample", False)) and temperature > 0,
    )
    if settings["do_sample"]:
        settings["temperature"] = temperature
        if gen_kwargs.get("top_p") is not None:
            settings["top_p"] = float(gen_kwargs["top_p"])
    return settings, until


def cut_at_stop_strings(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any non-empty stop string."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def continuation_score(logits: torch.Tensor, continuation_ids: torch.Tensor) -> Tuple[float, bool]:
    """lmms-eval's loglikelihood answer from the logits of a sequence ending in ``continuation_ids``: the summed
    log-probability of the continuation's tokens, and whether greedy decoding would have produced them."""
    count = continuation_ids.shape[-1]
    predicting = logits[0, -count - 1 : -1].float().log_softmax(-1)  # position t predicts token t + 1
    token_logprobs = predicting.gather(-1, continuation_ids.view(-1, 1).to(predicting.device)).squeeze(-1)
    greedy = bool((predicting.argmax(-1) == continuation_ids.view(-1).to(predicting.device)).all())
    return float(token_logprobs.sum()), greedy


class _HFBackend:
    """A transformers Llava / LlavaNext / LlavaOnevision checkpoint with its ``AutoProcessor``."""

    def __init__(self, pretrained: str, model_type: str, device: torch.device, dtype: torch.dtype, trust: bool):
        class_name = HF_MODEL_CLASSES[model_type]
        model_class = getattr(transformers, class_name, None)
        if model_class is None:
            raise ValueError(f"{pretrained}: transformers {transformers.__version__} has no {class_name}")
        self.model = model_class.from_pretrained(pretrained).to(device=device, dtype=dtype).eval()
        self.processor = transformers.AutoProcessor.from_pretrained(pretrained, trust_remote_code=trust)
        self.tokenizer = self.processor.tokenizer
        if self.tokenizer.pad_token is None:  # left padding of a batch; padded positions are masked out
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.image_token = getattr(self.processor, "image_token", "<image>")

    def prompt(self, context: str, num_images: int) -> str:
        if getattr(self.processor, "chat_template", None):
            content = [{"type": "image"}] * num_images + [{"type": "text", "text": context}]
            messages = [{"role": "user", "content": content}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        images = f"{self.image_token}\n" * num_images
        return f"{VICUNA_V1_SYSTEM} USER: {images}{context} ASSISTANT:"

    @torch.inference_mode()
    def generate(
        self, contexts: Sequence[str], images: Sequence[List[Image.Image]], settings: Dict[str, Any]
    ) -> List[str]:
        """The answers to a batch of requests (a context and its images each), left-padded, generated together."""
        prompts = [self.prompt(context, len(request_images)) for context, request_images in zip(contexts, images)]
        flat_images = [image for request_images in images for image in request_images]
        padding_side, self.tokenizer.padding_side = self.tokenizer.padding_side, "left"
        try:
            inputs = self.processor(images=flat_images or None, text=prompts, padding=True, return_tensors="pt").to(
                self.model.device
            )
        finally:
            self.tokenizer.padding_side = padding_side
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        output = self.model.generate(**inputs, pad_token_id=self.tokenizer.eos_token_id, **settings)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return [text.strip() for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    @torch.inference_mode()
    def loglikelihood(self, context: str, images: List[Image.Image], continuation: str) -> Tuple[float, bool]:
        """The log-probability of ``continuation`` right after the prompt of ``context`` (and its greediness)."""
        inputs = self.processor(images=images or None, text=self.prompt(context, len(images)), return_tensors="pt")
        continuation_ids = self.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
        inputs["input_ids"] = torch.cat([inputs["input_ids"], continuation_ids], dim=1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        inputs = inputs.to(self.model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return continuation_score(self.model(**inputs).logits, continuation_ids)


class _LlavaBackend:
    """A LLaVA-1.5 checkpoint (``llava-torch`` code, patched by :mod:`llava_patch`), prompted as model_vqa_loader."""

    def __init__(
        self, pretrained: str, model_base: Optional[str], conv_template: str, device: torch.device, trust: bool
    ):
        self.answerer = LlavaAnswerer(
            pretrained,
            image_folder="",
            model_base=model_base,
            conv_mode=conv_template,
            device=str(device),
            trust_remote_code=trust,
        )

    def generate(
        self, contexts: Sequence[str], images: Sequence[List[Image.Image]], settings: Dict[str, Any]
    ) -> List[str]:
        """The answers to a batch of requests with one image each (:meth:`LlavaAnswerer.answer_batch`)."""
        for request_images in images:
            if len(request_images) != 1:
                raise ValueError(
                    f"LLaVA-1.5 checkpoints answer with exactly one image per request, got {len(request_images)}"
                )
        return self.answerer.answer_batch(contexts, [request_images[0] for request_images in images], settings)

    @torch.inference_mode()
    def loglikelihood(self, context: str, images: List[Image.Image], continuation: str) -> Tuple[float, bool]:
        """The log-probability of ``continuation`` right after LLaVA's prompt of ``context`` with one image."""
        if len(images) != 1:
            raise ValueError(f"LLaVA-1.5 checkpoints answer with exactly one image per request, got {len(images)}")
        a = self.answerer
        prompt_ids = a.mm_utils.tokenizer_image_token(
            a.build_prompt(context), a.tokenizer, a.constants.IMAGE_TOKEN_INDEX, return_tensors="pt"
        )
        continuation_ids = a.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        pixels = a.mm_utils.process_images(images, a.image_processor, a.model.config)
        logits = a.model(
            input_ids=torch.cat([prompt_ids, continuation_ids]).unsqueeze(0).to(a.model.device),
            images=pixels.to(dtype=a.model.dtype, device=a.model.device),
            image_sizes=[images[0].size],
        ).logits
        return continuation_score(logits, continuation_ids)


class CLIPMoELlava(lmms):
    """lmms-eval model for CLIP-MoE LLaVA checkpoints (``--model clip_moe_llava --model_args pretrained=DIR``).

    Model arguments: ``pretrained`` (a local checkpoint directory), ``model_base`` (the base LLM of a LLaVA-1.5
    LoRA checkpoint), ``conv_template`` (LLaVA-1.5 checkpoints, default ``vicuna_v1``), ``device`` (default: cuda
    when available), ``dtype`` (``float16``, ``bfloat16`` or ``float32``; default float16 on GPU, float32 on
    CPU), ``trust_remote_code`` (let the checkpoint folder run its own code; off by default). lmms-eval's
    ``batch_size`` (a positive integer) is how many requests are answered together; ``max_batch_size`` is not used.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        model_base: Optional[str] = None,
        conv_template: str = "vicuna_v1",
        device: Optional[str] = None,
        dtype: Optional[str] = None,
        batch_size: Any = 1,
        max_batch_size: Optional[int] = None,
        trust_remote_code: bool = False,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"{MODEL_ID}: unknown model_args {', '.join(sorted(unknown))}")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"{MODEL_ID}: batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size_per_gpu = int(batch_size)
        self.pretrained = pretrained
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        requested, dtype = dtype, dtype or ("float16" if self._device.type == "cuda" else "float32")
        if dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"{MODEL_ID}: dtype must be float16, bfloat16 or float32, got {dtype!r}")
        config = read_config_dict(
            os.path.expanduser(pretrained), expected=f"a local checkpoint directory as {MODEL_ID}'s pretrained="
        )
        model_type = config.get("model_type")
        if model_type in HF_MODEL_CLASSES:
            self.backend: Any = _HFBackend(
                pretrained, model_type, self._device, getattr(torch, dtype), trust_remote_code
            )
        elif "mm_vision_tower" in config:
            if requested is not None and requested != dtype:  # LLaVA's loader picks fp16 on GPU, fp32 on CPU
                raise ValueError(f"{MODEL_ID}: LLaVA-1.5 checkpoints run in {dtype} here, not {requested}")
            self.backend = _LlavaBackend(pretrained, model_base, conv_template, self._device, trust_remote_code)
        else:
            raise ValueError(
                f"{pretrained}/config.json: model_type {model_type!r} is neither a LLaVA-1.5 checkpoint "
                f"(mm_vision_tower) nor one of {', '.join(HF_MODEL_CLASSES)}"
            )

    @property
    def device(self) -> torch.device:
        """Where the model runs."""
        return self._device

    def _visuals(self, request: Instance) -> Tuple[str, Any, List[Image.Image]]:
        """A request's context, second argument (generation kwargs or continuation) and images."""
        context, second, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        images = [visual.convert("RGB") for visual in visuals if isinstance(visual, Image.Image)]
        if len(images) != len(visuals):
            raise ValueError(f"{MODEL_ID}: task {task!r} gives non-image visuals (video/audio are not supported)")
        return context, second, images

    def generate_until(self, requests: List[Instance]) -> List[str]:
        """Answer the requests (context, generation kwargs, images) greedily unless they ask to sample, in batches
        of ``batch_size`` consecutive requests with the same generation kwargs; answers in request order."""
        answers: List[str] = []
        with tqdm(total=len(requests), disable=self.rank != 0, desc=MODEL_ID) as bar:
            for batch in self._batches(requests):
                visuals = [self._visuals(request) for request in batch]
                settings, until = generation_settings(visuals[0][1])
                texts = self.backend.generate([v[0] for v in visuals], [v[2] for v in visuals], settings)
                for (context, gen_kwargs, _), text in zip(visuals, texts):
                    answer = cut_at_stop_strings(text, until)
                    self.cache_hook.add_partial("generate_until", (context, gen_kwargs), answer)
                    answers.append(answer)
                bar.update(len(batch))
        return answers

    def _batches(self, requests: List[Instance]) -> List[List[Instance]]:
        """Consecutive requests with equal generation kwargs, at most ``batch_size`` per batch."""
        batches: List[List[Instance]] = []
        for request in requests:
            last = batches[-1] if batches else None
            if last and len(last) < self.batch_size_per_gpu and last[0].args[1] == request.args[1]:
                last.append(request)
            else:
                batches.append([request])
        return batches

    def loglikelihood(self, requests: List[Instance]) -> List[Tuple[float, bool]]:
        """For each request (context, continuation, images): the summed log-probability of the continuation's
        tokens after the prompt of the context, and whether greedy decoding would produce them (one at a time)."""
        results = []
        for request in tqdm(requests, disable=self.rank != 0, desc=f"{MODEL_ID} loglikelihood"):
            context, continuation, images = self._visuals(request)  # a loglikelihood request's 2nd argument
            result = self.backend.loglikelihood(context, images, continuation)
            self.cache_hook.add_partial("loglikelihood", (context, continuation), result)
            results.append(result)
        return results

    def generate_until_multi_round(self, requests: List[Instance]) -> List[str]:
        """Not supported."""
        raise NotImplementedError(f"{MODEL_ID} does not implement generate_until_multi_round")
