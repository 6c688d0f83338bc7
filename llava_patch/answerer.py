"""The answer function of ``clip-moe eval answer``: a LLaVA checkpoint (CLIP-MoE or CLIP tower) answering one
question at a time.

Mirrors LLaVA-1.5's ``llava/eval/model_vqa_loader.py``: ``<image>\\n`` + question in the ``vicuna_v1``
template, images through ``process_images``, greedy decoding at temperature 0, batch size 1, the stripped
decoded text as the answer. ``llava_patch.apply()`` runs first, so ``clip-moe`` towers load and trained tower
weights survive; no Python file of the checkpoint folders runs unless ``trust_remote_code`` is set.

The ``clip-moe`` command line (which never imports ``llava_patch``) finds :class:`LlavaAnswerer` through the
``mllm_encoder.answerers`` entry point named ``llava`` (``pyproject.toml``).
"""

import logging
import os
from typing import Any, Dict, Optional

import torch
from PIL import Image

import llava_patch
from mllm_encoder.eval.mllm.answering import load_question_image

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

    def __call__(self, question: Dict[str, Any]) -> str:
        """Answer one question (a question-file record with ``image`` and ``text``)."""
        image = load_question_image(self.image_folder, question["image"], self.allow_absolute_image_paths)
        return self.answer(question["text"], image)
