"""``clip-moe eval pope|mme|answer|merge``: MLLM benchmark answering, and scoring with LLaVA's, lmms-eval's or
VLMEvalKit's protocol (or all three side by side)."""

import argparse
import json
import logging
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

from mllm_encoder.atomic import atomic_write_json, check_output
from mllm_encoder.eval.mllm.answering import (
    answer_questions,
    get_chunk,
    load_question_file,
    merge_answer_files,
)
from mllm_encoder.eval.mllm.jsonl import JsonlRecord
from mllm_encoder.eval.mllm.mme import COGNITION, PERCEPTION, MMEResult, compare_mme_protocols, evaluate_mme
from mllm_encoder.eval.mllm.pope import PopeResult, compare_pope_protocols, evaluate_pope
from mllm_encoder.eval.mllm.protocols import PROTOCOLS, ProtocolComparison

logger = logging.getLogger(__name__)

# `clip-moe eval answer` answers with the class registered under this entry point group and name; the LLaVA
# answerer lives in llava_patch (pyproject.toml), which the library and this command line never import.
ANSWERER_GROUP = "mllm_encoder.answerers"
ANSWERER_NAME = "llava"


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
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when any data problem is found")
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS + ("all",),
        default="llava",
        help="whose answer parsing and metrics to use (default: llava, the published LLaVA-1.5 numbers); "
        "all: the three side by side, with the answers they read differently",
    )


def _register_pope(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("pope", help="score POPE answers (LLaVA's, lmms-eval's or VLMEvalKit's protocol)")
    parser.add_argument("--annotation-dir", required=True, help="folder of coco_pope_<split>.json (commit e3e39262)")
    _add_scoring_arguments(parser)
    parser.set_defaults(func=run_pope)


def _register_mme(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "mme", help="score MME answers (official calculation.py, lmms-eval or VLMEvalKit parsing)"
    )
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
    parser.add_argument(
        "--allow-absolute-image-paths", action="store_true", help="accept absolute image paths in the question file"
    )
    parser.add_argument("--answers-file", required=True, help="appended to; an existing file is resumed")
    parser.add_argument("--conv-mode", default="vicuna_v1")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--num_beams", type=int, default=1)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument(
        "--batch-size", type=int, default=1, help="questions answered together (left-padded; same greedy answers)"
    )
    parser.add_argument("--num-chunks", type=int, default=1, help="number of shards (one per GPU)")
    parser.add_argument("--chunk-idx", type=int, default=0, help="the shard this process answers")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="let the checkpoint folders run their own Python code"
    )
    parser.set_defaults(func=run_answer)


def _register_merge(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("merge", help="merge sharded answer files in question-file order")
    parser.add_argument("--question-file", required=True)
    parser.add_argument("--output", required=True, help="the merged answer file (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
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


PROTOCOL_NAMES = {"llava": "LLaVA", "lmms-eval": "lmms-eval", "vlmevalkit": "VLMEvalKit"}


def _fraction(value: Any) -> Any:
    """A fraction as a percentage for tables; '-' where the protocol reports no such number."""
    return "-" if value is None else 100 * value


def _print_disagreements(comparison: ProtocolComparison) -> None:
    """The count of answers the protocols read differently, with the first examples."""
    print(f"\n{len(comparison.disagreements)} of {comparison.num_scored} answers are read differently by the protocols")
    for d in comparison.disagreements[:10]:
        parses = ", ".join(f"{PROTOCOL_NAMES[name]}: {label}" for name, label in d.parses.items())
        print(f"  {d.location}: {d.text!r} (truth {d.truth}) -> {parses}")


def _score(
    args: argparse.Namespace,
    data: str,
    evaluate: Callable[..., Any],
    compare: Callable[..., ProtocolComparison],
    print_result: Callable[[Any], None],
    print_comparison: Callable[[ProtocolComparison], None],
) -> None:
    """Score ``--result-file`` under ``--protocol`` (or all three, with their disagreements) and print it."""
    check_output(args.output, [args.question_file, args.result_file, data], args.overwrite)
    if args.protocol == "all":
        report = compare(data, args.question_file, args.result_file)
        print_comparison(report)
        _print_disagreements(report)
    else:
        report = evaluate(data, args.question_file, args.result_file, protocol=args.protocol)
        print_result(report)
    _finish(args, report.to_dict())


def run_pope(args: argparse.Namespace) -> None:
    """Score POPE and print the per-split table and the protocol's headline F1 (or all three protocols)."""
    _score(args, args.annotation_dir, evaluate_pope, compare_pope_protocols, _print_pope, _print_pope_comparison)


def _print_pope(result: PopeResult) -> None:
    """The per-split and pooled table and the protocol's headline F1."""
    header = ["split", "N", "answered", "missing", "other", "acc", "precision", "recall", "F1", "yes-ratio"]
    header += ["TP", "FP", "TN", "FN"]
    rows = [
        [s.split, s.num_questions, s.num_answered, s.num_missing, s.num_other, 100 * s.accuracy, 100 * s.precision]
        + [100 * s.recall, 100 * s.f1, _fraction(s.yes_ratio), s.tp, s.fp, s.tn, s.fn]
        for s in list(result.splits.values()) + [result.overall]
    ]
    print(format_table(header, rows))
    if result.protocol == "llava":
        headline = f"LLaVA protocol, mean F1 over {len(result.splits)} splits"
    else:
        headline = f"{PROTOCOL_NAMES[result.protocol]} protocol, F1 over all {result.overall.num_answered} answers"
    print(f"\nPOPE ({headline}): {100 * result.headline_f1:.2f}")


def _print_pope_comparison(comparison: ProtocolComparison[PopeResult]) -> None:
    """The three protocols' F1 (reported, per split, pooled) and pooled metrics side by side."""
    splits = list(next(iter(comparison.results.values())).splits)
    header = ["protocol", "reported F1"] + [f"F1 {name}" for name in splits]
    header += ["F1 pooled", "acc pooled", "precision", "recall", "yes-ratio", "other"]
    rows = []
    for name, result in comparison.results.items():
        overall = result.overall
        rows.append(
            [PROTOCOL_NAMES[name], 100 * result.headline_f1]
            + [100 * s.f1 for s in result.splits.values()]
            + [100 * overall.f1, 100 * overall.accuracy, 100 * overall.precision, 100 * overall.recall]
            + [_fraction(overall.yes_ratio), overall.num_other]
        )
    print(format_table(header, rows))
    print("\nreported F1: LLaVA's mean of the per-split F1; lmms-eval's and VLMEvalKit's F1 over all answers pooled.")
    print("yes-ratio: LLaVA's share of 'yes' answers, lmms-eval's share of 'yes' ground truth (VLMEvalKit: none).")
    print("other: answers the protocol cannot read as yes/no (wrong; VLMEvalKit counts them as 'no' in its F1).")


def run_mme(args: argparse.Namespace) -> None:
    """Score MME and print the per-subtask table and the perception/cognition totals (or all three parsers)."""
    _score(args, args.mme_root, evaluate_mme, compare_mme_protocols, _print_mme, _print_mme_comparison)


def _print_mme(result: MMEResult) -> None:
    """The per-subtask table and the perception/cognition totals."""
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
    parsing = "" if result.protocol == "llava" else f", {PROTOCOL_NAMES[result.protocol]} answer parsing"
    print(f"\nMME perception ({perception}/{len(PERCEPTION)} subtasks{parsing}): {result.perception:.2f}")
    print(f"MME cognition ({cognition}/{len(COGNITION)} subtasks{parsing}): {result.cognition:.2f}")


def _print_mme_comparison(comparison: ProtocolComparison[MMEResult]) -> None:
    """The three parsers' perception, cognition and total side by side."""
    header = ["protocol", "perception", "cognition", "total", "other"]
    rows = [
        [
            PROTOCOL_NAMES[name],
            result.perception,
            result.cognition,
            result.perception + result.cognition,
            sum(s.num_other for s in result.subtasks.values()),
        ]
        for name, result in comparison.results.items()
    ]
    print(format_table(header, rows))
    print("\nall three sum acc + acc+ per subtask (x100); they differ only in how an answer is read as yes/no")


def answerer_class(name: str = ANSWERER_NAME) -> Callable[..., Any]:
    """The answerer class registered as ``name`` in the ``mllm_encoder.answerers`` entry point group."""
    registered = entry_points()  # Python 3.9 returns a dict of groups, 3.10+ an object with select()
    group = (
        registered.select(group=ANSWERER_GROUP) if hasattr(registered, "select") else registered.get(ANSWERER_GROUP, ())
    )
    found = [entry for entry in group if entry.name == name]
    if not found:
        raise ImportError(
            f"no answerer {name!r} is registered under the {ANSWERER_GROUP} entry points; install mllm-encoder "
            "with its LLaVA extra (pip install -e '.[llava]'), which provides llava_patch"
        )
    return found[0].load()


def run_answer(args: argparse.Namespace) -> None:
    """Answer this shard's questions with a LLaVA checkpoint, resuming an existing answer file."""
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if not Path(args.image_folder).is_dir():
        raise ValueError(f"{args.image_folder}: no such image folder (--image-folder)")
    inputs = [args.question_file, args.image_folder, args.model_path, args.model_base]
    check_output(args.answers_file, inputs, ours=_is_answer_file, what="an answer file", foreign_replaceable=False)
    records = load_question_file(args.question_file, args.image_folder, args.allow_absolute_image_paths)
    _warn_shared_question_ids(args.question_file, records)
    questions = get_chunk([record.data for record in records], args.num_chunks, args.chunk_idx)
    answerer = answerer_class()(
        args.model_path,
        args.image_folder,
        model_base=args.model_base,
        conv_mode=args.conv_mode,
        temperature=args.temperature,
        top_p=args.top_p,
        num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        allow_absolute_image_paths=args.allow_absolute_image_paths,
    )
    stats = answer_questions(questions, args.answers_file, answerer, answerer.model_name, batch_size=args.batch_size)
    print(
        f"{args.answers_file}: {stats.num_answered_now} answered now, {stats.num_already_answered} before, "
        f"{stats.num_skipped} skipped (unreadable image) "
        f"({stats.num_questions} questions in chunk {args.chunk_idx} of {args.num_chunks})"
    )
    if stats.num_skipped and not stats.num_answered_now:
        raise ValueError(
            f"{args.answers_file}: none of the {stats.num_skipped} questions left was answered (first: "
            f"{stats.skipped[0]}); check --image-folder and the question file's image paths"
        )


def _is_answer_file(path: Path) -> bool:
    """Whether ``path`` is an answer file (to resume): empty, or JSON lines with ``question_id``, ``prompt`` and
    ``text``, the last one possibly cut off by a killed writer."""
    try:
        lines = path.read_bytes().decode("utf-8").splitlines(keepends=True)
    except (OSError, UnicodeDecodeError):
        return False
    for position, line in enumerate(lines, start=1):
        try:
            record = json.loads(line) if line.strip() else {"question_id": 0, "prompt": "", "text": ""}
        except json.JSONDecodeError:
            if position == len(lines) and not line.endswith("\n") and line.lstrip().startswith("{"):
                continue
            return False
        if not isinstance(record, dict) or not {"question_id", "prompt", "text"} <= record.keys():
            return False
    return True


def _warn_shared_question_ids(question_file: str, records: Sequence[JsonlRecord]) -> None:
    """Warn about questions that share a ``question_id`` (scorers matching answers by id alone confuse them)."""
    first: Dict[str, int] = {}
    shared = []
    for record in records:
        key = json.dumps(record.data["question_id"])
        if key in first:
            shared.append(f"line {record.line} (as line {first[key]})")
        first.setdefault(key, record.line)
    if shared:
        logger.warning(
            "%s: %d questions share a question_id with an earlier one: %s%s; each is answered, but a scorer "
            "that matches answers by question_id alone cannot tell them apart",
            question_file,
            len(shared),
            ", ".join(shared[:3]),
            ", ..." if len(shared) > 3 else "",
        )


def run_merge(args: argparse.Namespace) -> None:
    """Merge shard answer files into one answer file in question-file order."""
    check_output(args.output, [args.question_file, *args.shards], args.overwrite)
    missing = merge_answer_files(args.question_file, args.shards, args.output, allow_missing=args.allow_missing)
    print(f"wrote {args.output} ({missing} questions without an answer)")
