"""Answers per second of batched answering (``LlavaAnswerer.answer_batch``) at several batch sizes.

A tiny random LLaVA-1.5 with a CLIP-MoE tower (tests/llava_fixtures.py) answers the same questions about images
of several sizes at each batch size (greedy, ``--max-new-tokens`` tokens, fp32 on CPU or fp16 on CUDA); prints a
table of answers/s and checks that every batch size gives batch size 1's answers.

usage: python scripts/bench_answer.py [--batch-sizes 1,8,32] [--questions 64] [--max-new-tokens 16]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from llava_fixtures import build_tiny_llava, synthetic_image  # noqa: E402

from llava_patch.integrations.answerer import LlavaAnswerer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory() as root:
        model_dir = build_tiny_llava(Path(root) / "llava-tiny-clip-moe")
        answerer = LlavaAnswerer(str(model_dir), root, device=args.device, max_new_tokens=args.max_new_tokens)
        colors = ("red", "green", "blue", "yellow")
        images = [synthetic_image(colors[i % 4], 24 + 8 * (i % 5), i) for i in range(args.questions)]
        texts = [f"Is there a {('cat', 'dog', 'car')[i % 3]} in the image?" + " Answer briefly." * (i % 3)
                 for i in range(args.questions)]  # fmt: skip
        reference = None
        print(
            f"device: {answerer.model.device}, dtype: {answerer.model.dtype}, torch threads: {torch.get_num_threads()}"
        )
        print(f"{args.questions} questions, {args.max_new_tokens} new tokens at most\n")
        print("| batch size | seconds | answers/s | speed-up | equal to batch size 1 |")
        print("| ---: | ---: | ---: | ---: | --- |")
        base_rate = None
        for size in batch_sizes:
            start = time.perf_counter()
            answers = []
            for first in range(0, len(texts), size):
                answers += answerer.answer_batch(texts[first : first + size], images[first : first + size])
            seconds = time.perf_counter() - start
            reference = answers if reference is None else reference
            rate = len(texts) / seconds
            base_rate = base_rate or rate
            print(f"| {size} | {seconds:.1f} | {rate:.1f} | {rate / base_rate:.2f} | {answers == reference} |")


if __name__ == "__main__":
    main()
