"""``clip-moe eval pope|mme|answer|merge``: MLLM benchmark answering and scoring with LLaVA's protocols."""

import argparse
import logging
import sys
from typing import Any, Dict, List, Sequence

from mllm_encoder.atomic import atomic_write_json
from mllm_encoder.eval.mllm.answering import (
    answer_questions,
    get_chunk,
    load_question_file,
    merge_answer_files,
)
from mllm_encoder.eval.mllm.mme import COGNITION, PERCEPTION, evaluate_mme
from mllm_encoder.eval.mllm.pope import evaluate_pope

logger = logging.getLogger(__name__)


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``pope``, ``mme``, ``answer`` and ``merge`` to the ``clip-moe eval`` subcommands."""
    _register_pope(commands)
    _register_mme(commands)
    _register_answer(commands)
    _register_merge(commands)


def _add_scoring_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--question-file", required=True, help="LLaVA's question file (JSON lines)")
    parser.add_argument("--result-file", required=True, help="answer file in LLaVA's format (JSON lines)")
    parser.add_argument("--output", help="write every number to this JSON file")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when any data problem is found")


def _register_pope(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("pope", help="score POPE answers (LLaVA's eval_pope.py protocol)")
    parser.add_argument("--annotation-dir", required=True, help="folder of coco_pope_<split>.json (commit e3e39262)")
    _add_scoring_arguments(parser)
    parser.set_defaults(func=run_pope)


def _register_mme(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("mme", help="score MME answers (MME's official calculation.py protocol)")
    parser.add_argument("--mme-root", required=True, help="the MME_Benchmark_release_version folder")
    _add_scoring_arguments(parser)
    parser.set_defaults(func=run_mme)


def _register_answer(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "answer", help="answer a LLaVA question file with a LLaVA checkpoint (resumable, shardable)"
    )
    parser.add_argument("--model-path", required=True, help="LLaVA checkpoint directory ('llava' in its name)")
    parser.add_argument("--model-base", default=None, help="base LLM for LoRA checkpoints")
    parser.add_argument("--question-file", required=True)
    parser.add_argument("--image-folder", required=True)
    parser.add_argument("--answers-file", required=True, help="appended to; an existing file is resumed")
    parser.add_argument("--conv-mode", default="vicuna_v1")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--num_beams", type=int, default=1)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--num-chunks", type=int, default=1, help="number of shards (one per GPU)")
    parser.add_argument("--chunk-idx", type=int, default=0, help="the shard this process answers")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.set_defaults(func=run_answer)


def _register_merge(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("merge", help="merge sharded answer files in question-file order")
    parser.add_argument("--question-file", required=True)
    parser.add_argument("--output", required=True, help="the merged answer file (written atomically)")
    parser.add_argument("--allow-missing", action="store_true", help="merge even if some questions lack answers")
    parser.add_argument("shards", nargs="+", help="the answer files of the shards")
    parser.set_defaults(func=run_merge)


def format_table(header: Sequence[str], rows: List[Sequence[Any]]) -> str:
    """A plain-text table with right-aligned columns (first column left-aligned)."""
    cells = [[str(c) for c in header]] + [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _finish(args: argparse.Namespace, report: Dict[str, Any]) -> None:
    """Write the JSON report if asked, list problems, and exit 1 under ``--strict`` when there were any."""
    if args.output:
        atomic_write_json(args.output, report)
        print(f"wrote {args.output}")
    if report["warnings"]:
        print(f"\n{len(report['warnings'])} data problem(s), see the warnings above (also in the JSON report)")
        if args.strict:
            sys.exit(1)


def run_pope(args: argparse.Namespace) -> None:
    """Score POPE and print the per-split table and the mean F1."""
    result = evaluate_pope(args.annotation_dir, args.question_file, args.result_file)
    header = [
        "split",
        "N",
        "answered",
        "missing",
        "acc",
        "precision",
        "recall",
        "F1",
        "yes-ratio",
        "TP",
        "FP",
        "TN",
        "FN",
    ]
    rows = [
        [s.split, s.num_questions, s.num_answered, s.num_missing, 100 * s.accuracy, 100 * s.precision]
        + [100 * s.recall, 100 * s.f1, 100 * s.yes_ratio, s.tp, s.fp, s.tn, s.fn]
        for s in result.splits.values()
    ]
    print(format_table(header, rows))
    print(f"\nPOPE (LLaVA protocol, mean F1 over {len(result.splits)} splits): {100 * result.mean_f1:.2f}")
    _finish(args, result.to_dict())


def run_mme(args: argparse.Namespace) -> None:
    """Score MME and print the per-subtask table and the perception/cognition totals."""
    result = evaluate_mme(args.mme_root, args.question_file, args.result_file)
    header = ["subtask", "questions", "images", "missing", "other", "acc", "acc+", "score"]
    rows = [
        [
            s.subtask,
            s.num_questions,
            s.num_images,
            s.num_missing,
            s.num_other,
            100 * s.acc,
            100 * s.acc_plus,
            s.score,
        ]
        for s in result.subtasks.values()
    ]
    print(format_table(header, rows))
    perception = sum(name in result.subtasks for name in PERCEPTION)
    cognition = sum(name in result.subtasks for name in COGNITION)
    print(f"\nMME perception ({perception}/{len(PERCEPTION)} subtasks): {result.perception:.2f}")
    print(f"MME cognition ({cognition}/{len(COGNITION)} subtasks): {result.cognition:.2f}")
    _finish(args, result.to_dict())


def run_answer(args: argparse.Namespace) -> None:
    """Answer this shard's questions with a LLaVA checkpoint, resuming an existing answer file."""
    from mllm_encoder.eval.mllm.llava_answerer import LlavaAnswerer

    questions = [record.data for record in load_question_file(args.question_file)]
    questions = get_chunk(questions, args.num_chunks, args.chunk_idx)
    answerer = LlavaAnswerer(
        args.model_path,
        args.image_folder,
        model_base=args.model_base,
        conv_mode=args.conv_mode,
        temperature=args.temperature,
        top_p=args.top_p,
        num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
    )
    stats = answer_questions(questions, args.answers_file, answerer, answerer.model_name)
    print(
        f"{args.answers_file}: {stats.num_answered_now} answered now, {stats.num_already_answered} before "
        f"({stats.num_questions} questions in chunk {args.chunk_idx} of {args.num_chunks})"
    )


def run_merge(args: argparse.Namespace) -> None:
    """Merge shard answer files into one answer file in question-file order."""
    missing = merge_answer_files(args.question_file, args.shards, args.output, allow_missing=args.allow_missing)
    print(f"wrote {args.output} ({missing} questions without an answer)")
