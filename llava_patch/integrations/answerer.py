"""The answer function of ``clip-moe eval answer``: a LLaVA checkpoint (CLIP-MoE or CLIP tower) answering one
question at a time, or a batch of them.

Mirrors LLaVA-1.5's ``llava/eval/model_vqa_loader.py``: ``<image>\\n`` + question in the ``vicuna_v1``
template, images through ``process_images``, greedy decoding at temperature 0, the stripped decoded text as the
answer. A batch is left-padded (LLaVA re-pads after splicing in the image features), its images go through the
tower together, and generation stops when every sequence has ended; greedy answers equal batch size 1's.
``llava_patch.apply()`` runs first, so ``clip-moe`` towers load and trained tower weights survive; no Python file
of the checkpoint folders runs unless ``trust_remote_code`` is set.

The ``clip-moe`` command line (which never imports ``llava_patch``) finds :class:`LlavaAnswerer` through the
``mllm_encoder.answerers`` entry point named ``llava`` (``pyproject.toml``).
"""

import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import transformers
from PIL import Image

import llava_patch
from mllm_encoder.eval.mllm.answering import BadImageError, load_question_image

logger = logging.getLogger(__name__)


def _import_llava():
    """Apply the CLIP-MoE patch to LLaVA and return its modules (a clear error when LLaVA is missing)."""
    llava_patch.apply()
    try:
        from llava import constants, conversation, mm_utils
        from llava.model.builder import load_pretrained_model
    except ImportError as error:
        raise ImportError(
            f"LLaVA is not importable ({error}); install it: pip install --no-deps llava-torch==1.2.2.post1"
        ) from error
    return constants, conversation, mm_utils, load_pretrained_model


class LlavaAnswerer:
    """Callable ``question -> answer text`` for a LLaVA checkpoint, answering as ``model_vqa_loader`` does."""

    def __init__(
        self,
        model_path: str,
        image_folder: str,
        model_base: Optional[str] = None,
        conv_mode: str = "vicuna_v1",
        temperature: float = 0.0,
        top_p: Optional[float] = None,
        num_beams: int = 1,
        max_new_tokens: int = 128,
        device: Optional[str] = None,
        trust_remote_code: bool = False,
        allow_absolute_image_paths: bool = False,
    ):
        self.constants, conversation, self.mm_utils, load_pretrained_model = _import_llava()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model_path = os.path.expanduser(model_path)
        self.model_name = self.mm_utils.get_model_name_from_path(model_path)
        self.tokenizer, self.model, self.image_processor, _ = load_pretrained_model(
            model_path, model_base, self.model_name, device=self.device, trust_remote_code=trust_remote_code
        )
        if self.image_processor is None:
            raise ValueError(
                f"{model_path}: LLaVA returned no image processor; its loader requires 'llava' in the "
                f"model directory's name (got {self.model_name!r})"
            )
        if self.device == "cpu":
            self.model.float()  # LLaVA loads float16, which CPUs run slowly or not at all
        if "plain" in self.model_name and "finetune" not in self.model_name.lower() and "mmtag" not in conv_mode:
            conv_mode = conv_mode + "_mmtag"
            logger.info("plain (pretrain-only) model: using the %s prompt, as LLaVA does", conv_mode)
        self.template = conversation.conv_templates[conv_mode]
        self.image_folder, self.allow_absolute_image_paths = image_folder, allow_absolute_image_paths
        self.generation = dict(
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_p=top_p,
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
        )

    def build_prompt(self, question_text: str) -> str:
        """The full conversation prompt for one question, with the image placeholder LLaVA expects."""
        c = self.constants
        if getattr(self.model.config, "mm_use_im_start_end", False):
            image_tokens = c.DEFAULT_IM_START_TOKEN + c.DEFAULT_IMAGE_TOKEN + c.DEFAULT_IM_END_TOKEN
        else:
            image_tokens = c.DEFAULT_IMAGE_TOKEN
        conv = self.template.copy()
        conv.append_message(conv.roles[0], image_tokens + "\n" + question_text)
        conv.append_message(conv.roles[1], None)
        return conv.get_prompt()

    @torch.inference_mode()
    def answer(self, question_text: str, image: Image.Image, generation: Optional[Dict[str, Any]] = None) -> str:
        """The stripped answer to ``question_text`` about ``image``: LLaVA's prompt, ``process_images``, then
        ``generate`` with ``generation`` (default: this answerer's settings) and the KV cache."""
        pixels = self.mm_utils.process_images([image], self.image_processor, self.model.config)
        input_ids = self.mm_utils.tokenizer_image_token(
            self.build_prompt(question_text), self.tokenizer, self.constants.IMAGE_TOKEN_INDEX, return_tensors="pt"
        ).unsqueeze(0)
        output_ids = self.model.generate(
            input_ids.to(self.model.device),
            images=pixels.to(dtype=self.model.dtype, device=self.model.device),
            image_sizes=[image.size],
            **{"use_cache": True, **(self.generation if generation is None else generation)},
        )
        return self.tokenizer.batch_decode(output_ids, skip_special_tokens=True)[0].strip()

    @torch.inference_mode()
    def answer_batch(
        self,
        question_texts: Sequence[str],
        images: Sequence[Image.Image],
        generation: Optional[Dict[str, Any]] = None,
    ) -> List[str]:
        """The stripped answers to several questions, one image each, generated as one left-padded batch: the
        same answers as :meth:`answer` one at a time (greedy decoding)."""
        if len(question_texts) != len(images):
            raise ValueError(f"{len(question_texts)} questions but {len(images)} images")
        if len(images) <= 1:
            return [self.answer(question_texts[0], images[0], generation)] if images else []
        if not hasattr(self.model, "set_attn_implementation"):  # e.g. 4.37.2, where batched generate fails (measured)
            logger.warning("transformers %s: answering one question at a time", transformers.__version__)
            return [self.answer(text, image, generation) for text, image in zip(question_texts, images)]
        prompts = [
            self.mm_utils.tokenizer_image_token(
                self.build_prompt(text), self.tokenizer, self.constants.IMAGE_TOKEN_INDEX, return_tensors="pt"
            )
            for text in question_texts
        ]
        length = max(len(prompt) for prompt in prompts)
        pad_id = self.pad_token_id
        input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, length - len(prompt) :] = prompt
            attention_mask[row, length - len(prompt) :] = 1
        pixels = self.mm_utils.process_images(list(images), self.image_processor, self.model.config)
        if isinstance(pixels, torch.Tensor):
            pixels = pixels.to(dtype=self.model.dtype, device=self.model.device)
        else:  # anyres: one tensor of patches per image
            pixels = [p.to(dtype=self.model.dtype, device=self.model.device) for p in pixels]
        config = self.model.config
        padding_side, attention = getattr(config, "tokenizer_padding_side", "right"), config._attn_implementation
        config.tokenizer_padding_side = "left"  # LLaVA re-pads the spliced embeddings on this side
        # SDPA decodes the left-padded rows of LLaVA's embedded prompts differently from batch size 1 after the
        # first token (transformers 5.25, measured); eager attention gives batch size 1's tokens.
        self.model.set_attn_implementation("eager")
        try:
            output_ids = self.model.generate(
                input_ids.to(self.model.device),
                attention_mask=attention_mask.to(self.model.device),
                # given position ids make LLaVA count positions from each prompt's first token (left padding)
                position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0).to(self.model.device),
                images=pixels,
                image_sizes=[image.size for image in images],
                pad_token_id=pad_id,
                **{"use_cache": True, **(self.generation if generation is None else generation)},
            )
        finally:
            config.tokenizer_padding_side = padding_side
            self.model.set_attn_implementation(attention)
        return [text.strip() for text in self.tokenizer.batch_decode(output_ids, skip_special_tokens=True)]

    @property
    def pad_token_id(self) -> int:
        """The id that fills the left of shorter prompts (masked out) and finished sequences (decoded away)."""
        for token_id in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if token_id is not None:
                return token_id
        raise ValueError(f"{self.model_name}: its tokenizer has neither a pad nor an end-of-sequence token")

    def __call__(self, question: Dict[str, Any]) -> str:
        """Answer one question (a question-file record with ``image`` and ``text``)."""
        image = load_question_image(self.image_folder, question["image"], self.allow_absolute_image_paths)
        return self.answer(question["text"], image)

    def answer_questions(self, questions: Sequence[Dict[str, Any]]) -> List[Union[str, BadImageError]]:
        """Answer several questions as one batch; a question whose image cannot be read gets its
        :class:`BadImageError` in place of an answer (the others are answered)."""
        loaded: List[Union[Image.Image, BadImageError]] = []
        for question in questions:
            try:
                loaded.append(
                    load_question_image(self.image_folder, question["image"], self.allow_absolute_image_paths)
                )
            except BadImageError as error:
                loaded.append(error)
        readable = [i for i, item in enumerate(loaded) if isinstance(item, Image.Image)]
        answers = self.answer_batch([questions[i]["text"] for i in readable], [loaded[i] for i in readable])
        results: List[Union[str, BadImageError]] = list(loaded)  # errors stay, images are replaced by answers
        for index, answer in zip(readable, answers):
            results[index] = answer
        return results
