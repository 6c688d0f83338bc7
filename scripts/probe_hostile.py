"""Run the hostile probes of issues 9 and 20 end to end against the ``clip-moe`` command line and count the outcomes.

Each probe runs one command (``python -m mllm_encoder ...``) on tiny local fixtures (a 2-layer CLIP-MoE, 40
synthetic images) and is judged:

* good: the command is refused with one line (``clip-moe COMMAND: error: ...``) naming what it should, no
  "internal error" and no traceback, and the user's files are as they were;
* weak: refused and nothing damaged, but the message is not such a line (or names the wrong thing);
* bad: the command succeeded, or a user's file was changed or created where it must not be.

Usage: ``python scripts/probe_hostile.py [--keep DIR]``; prints one line per probe and the counts, and exits 1
when any probe is bad. ``tests/guarantees/test_probe_hostile.py`` (slow) runs it.
"""

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import yaml
from safetensors.torch import load_file, save_file


@dataclass
class Probe:
    """One hostile command: what its refusal must name, and what must hold afterwards."""

    name: str
    argv: Sequence[str]
    names: Sequence[str]  # substrings the error line must contain
    holds: Callable[[], bool] = lambda: True  # the user's files are intact
    env: Dict[str, str] = field(default_factory=dict)


def run_clip_moe(argv: Sequence[str], env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """``python -m mllm_encoder ARGV`` in a subprocess (the same interpreter and PYTHONPATH)."""
    command = [sys.executable, "-m", "mllm_encoder", *map(str, argv)]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)


def judge(probe: Probe) -> str:
    """``good``, ``weak`` or ``bad`` (see the module docstring), with the reason."""
    result = run_clip_moe(probe.argv, probe.env)
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("clip-moe ")]
    last = lines[-1] if lines else ""
    if result.returncode == 0:
        return "bad: exit status 0"
    if not probe.holds():
        return f"bad: a user's file was changed ({last or result.stderr.strip()[-200:]})"
    if "Traceback" in result.stderr or "internal error" in last or ": error: " not in last:
        return f"weak: not a one-line refusal ({(last or result.stderr.strip())[-200:]})"
    missing = [name for name in probe.names if name not in last]
    if missing:
        return f"weak: the refusal does not name {missing} ({last[-200:]})"
    return "good"


def _unchanged(*paths: Path) -> Callable[[], bool]:
    before = {path: path.read_bytes() for path in paths}
    return lambda: all(path.exists() and path.read_bytes() == data for path, data in before.items())


def _absent(path: Path) -> Callable[[], bool]:
    return lambda: not path.exists()


def _user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "report.md").write_text("my report\n")
    (path / "results.json").write_text('{"mine": true}\n')
    (path / "config.yaml").write_text("my: notes\n")
    return path


class _Payload:
    def __reduce__(self):  # harmless when called; weights-only loading must never call it
        return (os.path.join, ("payload", "ran"))


def build_fixtures(root: Path) -> Dict[str, Path]:
    """A tiny dense CLIP-MoE base (2 layers, context 32), 40 synthetic training images and a run config."""
    from transformers import AutoTokenizer

    from mllm_encoder import CLIPMoEConfig, CLIPMoEModel
    from mllm_encoder.checkpoint import default_image_processor, save_checkpoint
    from mllm_encoder.conversion.tokenizer import write_clip_tokenizer
    from mllm_encoder.data.synthetic import write_shapes_dataset

    write_clip_tokenizer(root / "tokenizer", context_length=32)
    torch.manual_seed(0)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPMoEConfig(
        vision_config=dict(image_size=32, patch_size=8, **common),
        text_config=dict(vocab_size=49408, max_position_embeddings=32, eos_token_id=49407, **common),
        projection_dim=16,
    )
    base = root / "base"
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    save_checkpoint(CLIPMoEModel(config), base, default_image_processor(32), tokenizer)
    data = write_shapes_dataset(root / "data", num_train=40, num_eval=8, image_size=32, progress=False)
    return {"base": base, "train": Path(data["train"]), "image_root": Path(data["image_root"])}


def run_config(run_dir: Path, base: Path, train: Path, **changes) -> Dict:
    stage = dict(steps=2, batch_size=4, warmup_steps=1, lr=1e-3)
    values = {
        "base_model": str(base),
        "run_dir": str(run_dir),
        "data": {"train": str(train)},
        "dmu": {"num_experts": 2, "top_k": 2, "extract_batch_size": 16, "kmeans_backend": "torch"},
        "mcl": dict(stage),
        "route": dict(stage),
        "baseline": dict(stage),
        "runtime": {"save_every": 1, "log_every": 1, "mixed_precision": "no"},
    }
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        values[section][key] = value
    return values


def _write_config(path: Path, values: Dict, comment: str = "# my experiment\n") -> Path:
    path.write_text(comment + yaml.safe_dump(values))
    return path


def probes(root: Path, fixtures: Dict[str, Path]) -> List[Probe]:
    """The hostile cases; each builds what it needs under ``root``."""
    base, train = fixtures["base"], fixtures["train"]
    found: List[Probe] = []

    user = _user_folder(root / "demo-user")
    found.append(
        Probe(
            "demo --out a folder of the user's files",
            ["demo", "--quick", "--out", user],
            [str(user)],
            _unchanged(user / "report.md", user / "results.json"),
        )
    )
    user = _user_folder(root / "run-user")
    config = _write_config(root / "elsewhere.yaml", run_config(root / "elsewhere", base, train))
    found.append(
        Probe(
            "dmu run --run-dir a folder of the user's files",
            ["dmu", "run", config, "--run-dir", user, "--method", "finetune"],
            [str(user), "--overwrite"],
            _unchanged(user / "config.yaml", user / "results.json"),
        )
    )

    answers = root / "answers.jsonl"
    answers.write_text('{"question_id": 0, "prompt": "Q0?", "text": "yes"}\n')
    questions = root / "questions.jsonl"
    questions.write_text('{"question_id": 0, "text": "Q0?", "image": "0.jpg"}\n')
    scoring = ["--question-file", questions, "--result-file", answers]
    found.append(
        Probe(
            "eval pope --output = --result-file",
            ["eval", "pope", "--annotation-dir", root, *scoring, "--output", answers, "--overwrite"],
            ["the output is the input"],
            _unchanged(answers),
        )
    )
    found.append(
        Probe(
            "eval mme --output = --question-file",
            ["eval", "mme", "--mme-root", root, *scoring, "--output", questions],
            ["the output is the input"],
            _unchanged(questions),
        )
    )
    for output in (questions, answers):
        found.append(
            Probe(
                f"eval merge --output = {output.name}",
                ["eval", "merge", "--question-file", questions, "--output", output, answers],
                ["the output is the input"],
                _unchanged(questions, answers),
            )
        )
    notes = root / "notes.json"
    notes.write_text("mine\n")
    found.append(
        Probe(
            "eval retrieval --output an unrelated file",
            ["eval", "retrieval", "--model", base, "--data", train, "--output", notes],
            [str(notes), "--overwrite"],
            _unchanged(notes),
        )
    )

    for key, value, named in [
        ("dmu__moe_layers", [0, 7], "dmu.moe_layers"),
        ("dmu__image_clusters", 50, "dmu.image_clusters"),
        ("mcl__batch_size", 100, "mcl.batch_size"),
        ("dmu__text_context", 32, "dmu.text_context"),
    ]:
        run_dir = root / f"run-{key}"
        config = _write_config(root / f"{key}.yaml", run_config(run_dir, base, train, **{key: value}))
        found.append(
            Probe(
                f"dmu run with {named}: {value} (checked before any stage)",
                ["dmu", "run", config],
                [str(config), named],
                _absent(run_dir),
            )
        )
    run_dir = root / "run-missing-base"
    config = _write_config(root / "missing-base.yaml", run_config(run_dir, root / "no-base", train))
    found.append(
        Probe("dmu run with a missing base (no run.log)", ["dmu", "run", config], ["no-base"], _absent(run_dir))
    )

    folder = root / "pickle-model"
    folder.mkdir()
    for entry in base.iterdir():
        if entry.name != "model.safetensors":
            (folder / entry.name).write_bytes(entry.read_bytes())
    torch.save({**load_file(str(base / "model.safetensors")), "x": _Payload()}, folder / "pytorch_model.bin")
    found.append(
        Probe(
            "inspect a checkpoint whose pytorch_model.bin holds a pickle payload",
            ["inspect", folder],
            ["pytorch_model.bin"],
        )
    )
    folder = root / "truncated-model"
    folder.mkdir()
    for entry in base.iterdir():
        data = entry.read_bytes()
        (folder / entry.name).write_bytes(data[: len(data) // 2] if entry.name == "model.safetensors" else data)
    found.append(Probe("inspect a truncated model.safetensors", ["inspect", folder], ["model.safetensors"]))
    folder = root / "nan-model"
    folder.mkdir()
    for entry in base.iterdir():
        (folder / entry.name).write_bytes(entry.read_bytes())
    state = load_file(str(folder / "model.safetensors"))
    name = sorted(key for key in state if key.endswith("fc1.weight"))[0]
    state[name][0, 0] = float("nan")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    found.append(
        Probe(
            "upcycle a model with a NaN weight",
            ["upcycle", folder, root / "nan-out", "--num-experts", "2"],
            ["NaN", name],
            _absent(root / "nan-out"),
        )
    )
    found.append(
        Probe(
            "assemble A B --out A --overwrite",
            ["assemble", base, base, "--out", base, "--overwrite"],
            ["the output is the input"],
            _unchanged(base / "model.safetensors"),
        )
    )
    user = _user_folder(root / "upcycle-user")
    found.append(
        Probe(
            "upcycle into a folder of the user's files, --overwrite",
            ["upcycle", base, user, "--num-experts", "2", "--overwrite"],
            [str(user)],
            _unchanged(user / "report.md"),
        )
    )

    empty = root / "no-images"
    empty.mkdir()
    found.append(
        Probe(
            "dmu extract --max-bad-fraction 1.0 with every image missing",
            [
                "dmu",
                "extract",
                "--model",
                base,
                "--out",
                root / "features",
                "--data",
                train,
                "--image-root",
                empty,
                "--max-bad-fraction",
                "1.0",
            ],
            ["none of the 40 samples"],
        )
    )
    linked = root / "linked-images"
    linked.mkdir()
    records = json.loads(train.read_text())
    for record in records:
        target = linked / record["image"]
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(fixtures["image_root"] / record["image"])
    (linked / records[0]["image"]).unlink()
    (linked / records[0]["image"]).symlink_to("/etc/passwd")
    found.append(
        Probe(
            "dmu extract with an image symlinked to /etc/passwd",
            ["dmu", "extract", "--model", base, "--out", root / "features2", "--data", train, "--image-root", linked],
            ["symbolic link", records[0]["image"]],
        )
    )

    answer = ["eval", "answer", "--model-path", root / "llava-none", "--answers-file", root / "a.jsonl"]
    found.append(
        Probe(
            "eval answer --image-folder missing",
            [*answer, "--question-file", questions, "--image-folder", root / "missing"],
            ["--image-folder"],
            _absent(root / "a.jsonl"),
        )
    )
    null_text = root / "null.jsonl"
    null_text.write_text('{"question_id": 0, "text": null, "image": "0.jpg"}\n')
    found.append(
        Probe(
            'eval answer with "text": null',
            [*answer, "--question-file", null_text, "--image-folder", root],
            [f"{null_text}:1", "text"],
            _absent(root / "a.jsonl"),
        )
    )
    if not torch.cuda.is_available():
        found.append(
            Probe(
                "eval retrieval --device cuda without CUDA",
                ["eval", "retrieval", "--model", base, "--data", train, "--device", "cuda"],
                ["--device cuda"],
            )
        )
    return found


def probe_locked_run(root: Path, fixtures: Dict[str, Path]) -> Probe:
    """A second ``dmu run`` on a run directory another process holds (a lock of this process)."""
    from mllm_encoder.locking import directory_lock

    run_dir = root / "locked-run"
    config = _write_config(root / "locked.yaml", run_config(run_dir, fixtures["base"], fixtures["train"]))
    directory_lock(run_dir).acquire()  # released when this script exits
    return Probe(
        "dmu run on a run directory another process holds",
        ["dmu", "run", config, "--method", "finetune"],
        ["is in use by pid", ".lock"],
        _absent(run_dir / "manifest.json"),
    )


def run_directory_config_probes(root: Path, fixtures: Dict[str, Path]) -> List[str]:
    """The run directory's own config, file modes: a real (tiny) run, then a hostile rerun. Returns verdicts."""
    run_dir = root / "own-config-run"
    run_dir.mkdir()
    config = _write_config(run_dir / "config.yaml", run_config(run_dir, fixtures["base"], fixtures["train"]))
    original = config.read_bytes()
    previous = os.umask(0o022)
    try:
        first = run_clip_moe(["dmu", "run", config, "--method", "finetune", "--overwrite"])
    finally:
        os.umask(previous)
    verdicts = []
    if first.returncode != 0:
        return [f"bad: the tiny run failed: {first.stderr.strip()[-300:]}"] * 3
    verdicts.append("good" if config.read_bytes() == original else "bad: the user's config file was rewritten")
    modes = {path: oct(path.stat().st_mode & 0o777) for path in run_dir.rglob("*") if path != config}
    wrong = {str(path): mode for path, mode in modes.items() if mode != ("0o755" if path.is_dir() else "0o644")}
    verdicts.append("good" if not wrong else f"bad: modes under umask 022 {dict(list(wrong.items())[:3])}")
    values = run_config(run_dir, fixtures["base"], fixtures["train"], mcl__steps=3)
    _write_config(config, values)
    probe = Probe(
        "dmu run RUN_DIR/config.yaml after editing mcl.steps",
        ["dmu", "run", config, "--method", "finetune"],
        ["mcl.steps", "finetune/train"],
        lambda: json.loads((run_dir / "manifest.json").read_text())["config"]["mcl"]["steps"] == 2,
    )
    verdicts.append(judge(probe))
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="build the fixtures in this (new) folder and keep them")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="probe_hostile_"))
    root.mkdir(parents=True, exist_ok=True)
    assert pickle.loads(pickle.dumps(_Payload())) == os.path.join("payload", "ran")  # the payload is real
    fixtures = build_fixtures(root / "fixtures")
    counts = {"good": 0, "weak": 0, "bad": 0}
    cases = [*probes(root, fixtures), probe_locked_run(root, fixtures)]
    results = [(probe.name, judge(probe)) for probe in cases]
    names = [
        "dmu run RUN_DIR/config.yaml leaves the file as written",
        "every file of the run is 0644/0755 (umask 022)",
        "dmu run RUN_DIR/config.yaml after editing mcl.steps",
    ]
    results += list(zip(names, run_directory_config_probes(root, fixtures)))
    for name, verdict in results:
        counts[verdict.split(":")[0]] += 1
        print(f"{verdict.split(':')[0]:5}  {name}" + (f"  -- {verdict.split(': ', 1)[1]}" if ":" in verdict else ""))
    print(f"\n{len(results)} probes: {counts['good']} good, {counts['weak']} weak, {counts['bad']} bad")
    sys.exit(1 if counts["bad"] else 0)


if __name__ == "__main__":
    main()
