"""The docs check's harness: every fenced block of README.md and docs/*.md, run on tiny local fixtures.

A block is tagged ``bash`` / ``sh`` / ``shell`` or ``python`` (run), or ``text`` and the like (output,
diagrams, file layouts: not run); an untagged fence is an error. A block that cannot run here (a GPU, a hub
download, a real data set, a cluster) carries the line ``<!-- docs-check: skip (REASON) -->`` directly above
its fence and is counted as marked.

Runnable blocks run in a fresh folder whose entries are the fixtures that the docs name (``path/to/clip-moe``,
``base``, ``lmsys/vicuna-7b-v1.5``, ``./checkpoints/llava-v1.5-7b-clip-moe``, ...: :data:`FIXTURES`, built once
and linked in), with ``HOME`` there too (``~/.cache/...``). Python blocks run in-process. Shell blocks are read
command by command (``\\`` continuations joined, ``#`` comments dropped, leading ``NAME=value`` set for the
command): ``clip-moe ARGS`` runs in-process as ``python -m mllm_encoder ARGS``, except long jobs
(:data:`LONG_JOBS`), whose arguments are parsed by the real parser and not run (a renamed flag still fails);
``make TARGET`` is ``make -n`` in the repository, its ``clip-moe`` recipe lines parsed the same way; any other
command runs in ``bash``.
"""

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

REPO_ROOT = Path(__file__).resolve().parents[1]
SKIP_MARKER = re.compile(r"^<!-- docs-check: skip \((.+)\) -->$")
FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")
SHELL = ("bash", "sh", "shell", "console")
PYTHON = ("python", "py")
# `clip-moe` commands whose arguments are parsed, not run: the long jobs (minutes to hours, or a LLaVA model).
LONG_JOBS = (("demo",), ("dmu", "run"), ("eval", "answer"))


@dataclass
class Block:
    """One fenced block: where it is, its tag, its text and, when marked, why it is not run."""

    file: str  # relative to the repository root
    line: int  # of the opening fence, 1-based
    language: str
    text: str
    skip_reason: Optional[str] = None

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def kind(self) -> str:
        """``shell``, ``python``, ``untagged`` or ``text`` (every other tag: not code)."""
        if self.language in SHELL:
            return "shell"
        if self.language in PYTHON:
            return "python"
        return "untagged" if not self.language else "text"

    def describe(self) -> str:
        """The block as the doc shows it, for failure messages."""
        return f"{self.where} (```{self.language}):\n" + "\n".join(f"    {line}" for line in self.text.splitlines())


def doc_files() -> List[Path]:
    """README.md and docs/*.md."""
    return [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


def extract_blocks(path: Path, root: Path = REPO_ROOT) -> List[Block]:
    """The fenced blocks of one Markdown file, in order (``Block.file`` relative to ``root``)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, index = [], 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        indent, fence, language = match.groups()
        start, body = index, []
        index += 1
        while index < len(lines) and not lines[index].strip().startswith(fence):
            body.append(lines[index][len(indent) :] if lines[index].startswith(indent) else lines[index])
            index += 1
        index += 1  # the closing fence
        previous = lines[start - 1].strip() if start else ""
        marker = SKIP_MARKER.match(previous)
        relative = str(path.relative_to(root))
        blocks.append(Block(relative, start + 1, language.lower(), "\n".join(body), marker and marker.group(1)))
    return blocks


def all_blocks() -> List[Block]:
    return [block for path in doc_files() for block in extract_blocks(path)]


# ---------------------------------------------------------------------------------------------- fixtures


def _tiny_dense_clip(vision_layers: int = 3, text_layers: int = 2, seed: int = 1):
    import torch
    from tiny_models import tiny_text_config, tiny_vision_config
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    vision = tiny_vision_config(num_hidden_layers=vision_layers)
    text = tiny_text_config(num_hidden_layers=text_layers, max_position_embeddings=77)  # CLIP's text context
    return CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=16))


def _save_dense(model, path: Path) -> None:
    from mllm_encoder.checkpoint import default_image_processor, save_checkpoint
    from mllm_encoder.conversion.tokenizer import build_clip_tokenizer

    save_checkpoint(model, path, default_image_processor(32), build_clip_tokenizer(77))


def _build_clip_moe(path: Path) -> None:
    import torch
    from tiny_models import tiny_clip_moe_config

    from mllm_encoder import CLIPMoEModel
    from mllm_encoder.checkpoint import save_checkpoint
    from mllm_encoder.conversion.tokenizer import build_clip_tokenizer

    torch.manual_seed(0)
    save_checkpoint(CLIPMoEModel(tiny_clip_moe_config()), path, tokenizer=build_clip_tokenizer(16))


def _build_vit_l_depth_clip(path: Path) -> None:
    """A dense CLIP with ViT-L/14's depths (24 image layers, 12 text layers) at the tiny width."""
    _save_dense(_tiny_dense_clip(vision_layers=24, text_layers=12), path)


def _build_stages(root: Path) -> None:
    """``base`` and ``stage1..3``: dense CLIPs that differ only in their FFNs (what DMU's MCL stages give)."""
    import torch

    model = _tiny_dense_clip()
    _save_dense(model, root / "base")
    for stage in (1, 2, 3):
        torch.manual_seed(stage)
        for name, param in model.named_parameters():
            if ".mlp." in name:
                param.data.add_(torch.randn_like(param) * 0.01)
        _save_dense(model, root / f"stage{stage}")


def _build_official_release(path: Path) -> None:
    """A tiny checkpoint in the released CLIP-MoE layout (OpenAI / Long-CLIP names, MoE in the last blocks)."""
    import torch
    from tiny_models import ReferenceOpenAICLIPMoE

    torch.manual_seed(0)
    torch.save(ReferenceOpenAICLIPMoE().state_dict(), path)


def _build_llm(path: Path) -> None:
    from llava_fixtures import build_tiny_llama

    build_tiny_llama(path)


def _build_llava(path: Path) -> None:
    from llava_fixtures import build_tiny_llava

    build_tiny_llava(path)


def _build_photo(path: Path) -> None:
    from llava_fixtures import synthetic_image

    synthetic_image("red", 32, 0).convert("RGB").save(path)


def _write_jsonl(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def _build_eval_data(root: Path) -> None:
    """LLaVA's ``playground/data/eval`` layout in miniature: POPE (3 questions, annotations, images, the two
    answer shards ``clip-moe eval answer`` writes) and MME (one subtask, its answers)."""
    from llava_fixtures import synthetic_image

    pope, suffix = root / "pope", "\nAnswer the question using a single word or phrase."
    (pope / "val2014").mkdir(parents=True)
    questions, annotations, answers = [], [], []
    for i, (color, name) in enumerate((("red", "cat"), ("green", "dog"), ("blue", "car")), start=1):
        synthetic_image(color, 32, i).save(pope / "val2014" / f"{i}.png")
        text = f"Is there a {name} in the image?"
        questions.append({"question_id": i, "image": f"{i}.png", "text": text + suffix, "category": "random"})
        annotations.append({"question_id": i, "image": f"{i}.png", "text": text, "label": "yes" if i % 2 else "no"})
        answers.append({"question_id": i, "prompt": text + suffix, "text": "Yes" if i < 3 else "No"})
    _write_jsonl(pope / "llava_pope_test.jsonl", questions)
    _write_jsonl(pope / "coco" / "coco_pope_random.json", annotations)
    shards = pope / "answers" / "llava-v1.5-7b-clip-moe"
    _write_jsonl(shards / "2_0.jsonl", answers[:2])
    _write_jsonl(shards / "2_1.jsonl", answers[2:])

    mme = root / "MME"
    category = mme / "MME_Benchmark_release_version" / "existence"
    category.mkdir(parents=True)
    (category / "000000.jpg").write_bytes(b"")
    truth = {"Is there a dog in this image?": "Yes", "Is there a cat in this image?": "No"}
    (category / "000000.txt").write_text("".join(f"{q} Please answer yes or no.\t{a}\n" for q, a in truth.items()))
    questions = [{"question_id": "existence/000000.jpg", "image": "existence/000000.jpg",
                  "text": q + suffix, "category": "existence"} for q in truth]  # fmt: skip
    _write_jsonl(mme / "llava_mme.jsonl", questions)
    answers = [dict(question_id=q["question_id"], prompt=q["text"], text=a) for q, a in zip(questions, truth.values())]
    _write_jsonl(mme / "answers" / "llava-v1.5-7b-clip-moe.jsonl", answers)


# a path the docs name (relative to the folder a block runs in) -> the function that builds it there
FIXTURES: Dict[str, Callable[[Path], None]] = {
    "path/to/clip-moe": _build_clip_moe,
    "clip-vit-large-patch14-336": _build_vit_l_depth_clip,
    "stage1": _build_stages,
    "clip-moe-4-2-sharegpt4v.pt": _build_official_release,
    "lmsys/vicuna-7b-v1.5": _build_llm,
    "checkpoints/llava-v1.5-7b-clip-moe": _build_llava,
    "photo.jpg": _build_photo,
    "playground/data/eval": _build_eval_data,
}
FIXTURE_ENTRIES = {"stage1": ("base", "stage1", "stage2", "stage3")}  # builders of several entries (given the root)


class Fixtures:
    """The fixtures, each built the first time a block names it, under one shared folder."""

    def __init__(self, root: Path):
        self.root = root
        self.built: set = set()

    def entries_for(self, text: str) -> List[str]:
        """Top-level names (under :attr:`root`) of the fixtures ``text`` mentions, built now if needed."""
        entries = []
        for name, build in FIXTURES.items():
            if name not in text:
                continue
            if name not in self.built:
                target = self.root if name in FIXTURE_ENTRIES else self.root / name
                target.parent.mkdir(parents=True, exist_ok=True)
                build(target)
                self.built.add(name)
            entries += FIXTURE_ENTRIES.get(name, (name.split("/")[0],))
        return entries


# ---------------------------------------------------------------------------------------------- running


class BlockFailure(AssertionError):
    """A block that did not run as written; the message names the file, line and command."""


@contextlib.contextmanager
def _environment(cwd: Path, env: Dict[str, str]) -> Iterator[None]:
    previous_cwd, previous_env = Path.cwd(), dict(os.environ)
    os.chdir(cwd)
    os.environ.update(env)
    try:
        yield
    finally:
        os.chdir(previous_cwd)
        os.environ.clear()
        os.environ.update(previous_env)


def prepare_workdir(block: Block, fixtures: Fixtures, workdir: Path) -> None:
    """A fresh folder for ``block`` with links to the fixtures it names."""
    workdir.mkdir(parents=True)
    for entry in fixtures.entries_for(block.text):
        link = workdir / entry
        if not link.exists():
            link.symlink_to(fixtures.root / entry, target_is_directory=(fixtures.root / entry).is_dir())


def shell_commands(text: str) -> List[str]:
    """The logical command lines of a shell block (continuations joined; blank and comment lines dropped)."""
    joined = re.sub(r"\\\n", " ", text)
    return [line for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def _split(command: str) -> Tuple[Dict[str, str], List[str]]:
    words = [os.path.expanduser(os.path.expandvars(word)) for word in shlex.split(command, comments=True)]
    env = {}
    while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    return env, words


def _clip_moe(args: List[str]) -> str:
    """Run (or, for :data:`LONG_JOBS`, only parse) ``clip-moe ARGS`` in-process; returns what it printed."""
    from mllm_encoder.cli import build_parser, main

    output = io.StringIO()
    if any(tuple(args[: len(job)]) == job for job in LONG_JOBS):
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            try:
                build_parser().parse_args(args)
            except SystemExit as exit_:
                if exit_.code:
                    raise BlockFailure(f"the arguments do not parse: {output.getvalue().strip()}") from None
        return output.getvalue()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        try:
            main(args)
        except SystemExit as exit_:
            if exit_.code:
                raise BlockFailure(f"exit status {exit_.code}: {output.getvalue().strip()[-2000:]}") from None
    return output.getvalue()


def _make(args: List[str]) -> str:
    """``make -n ARGS`` in the repository (the target must exist); its ``clip-moe`` lines are parsed."""
    result = subprocess.run(["make", "-n", "-C", str(REPO_ROOT), *args], capture_output=True, text=True)
    if result.returncode:
        raise BlockFailure(f"make -n {' '.join(args)}: {result.stderr.strip()}")
    for line in result.stdout.splitlines():
        words = shlex.split(line)
        clip_moe = [i for i, word in enumerate(words) if word.endswith("/clip-moe") or word == "clip-moe"]
        if clip_moe:
            from mllm_encoder.cli import build_parser

            try:
                build_parser().parse_args(words[clip_moe[0] + 1 :])
            except SystemExit:
                raise BlockFailure(f"make {' '.join(args)} runs `{line}`, whose arguments do not parse") from None
    return result.stdout


def run_shell_command(command: str, workdir: Path) -> str:
    """One logical command line of a shell block, in ``workdir``."""
    env, words = _split(command)
    if not words:
        return ""
    if words[0] == "clip-moe":
        with _environment(workdir, env):
            return _clip_moe(words[1:])
    if words[0] == "make":
        return _make(words[1:])
    if words[0] in ("pip", "pip3") or words[:3] == ["python", "-m", "pip"]:
        raise BlockFailure("installs packages: mark the block `<!-- docs-check: skip (REASON) -->`")
    if words[0] == "python":
        words[0] = sys.executable
        command = shlex.join(words)
    result = subprocess.run(
        ["bash", "-c", command], cwd=workdir, env={**os.environ, **env}, capture_output=True, text=True, timeout=600
    )
    if result.returncode:
        raise BlockFailure(f"exit status {result.returncode}: {(result.stdout + result.stderr).strip()[-2000:]}")
    return result.stdout


def run_block(block: Block, fixtures: Fixtures, workdir: Path) -> None:
    """Run ``block`` in ``workdir`` (created here); :class:`BlockFailure` names the file, line and command."""
    prepare_workdir(block, fixtures, workdir)
    home = {"HOME": str(workdir), "XDG_CACHE_HOME": str(workdir / ".cache")}
    if block.kind == "python":
        with _environment(workdir, home):
            try:
                exec(compile(block.text, block.where, "exec"), {"__name__": "__docs__"})
            except Exception as error:
                raise BlockFailure(f"{block.describe()}\nfailed: {type(error).__name__}: {error}") from error
        return
    with _environment(workdir, home):
        for number, command in enumerate(shell_commands(block.text), start=1):
            try:
                run_shell_command(command, workdir)
            except BlockFailure as failure:
                message = f"{block.describe()}\ncommand {number} `{command.strip()}` failed: {failure}"
                raise BlockFailure(message) from failure
