"""``clip-moe dmu {run,plan,extract,cluster,mcl,assemble,route,eval}`` and ``clip-moe demo``.

``run`` drives the whole method from a YAML config (resumable); the other subcommands run one stage each
on explicit directories, with the same code. Launch any of them with ``accelerate launch`` or ``torchrun``
for several GPUs or nodes (see ``scripts/dmu/``). The flags build the same typed sections as the YAML
(:mod:`mllm_encoder.dmu.config`), with the same defaults and checks; the training stack (torch, accelerate)
is imported when a command runs, so that ``clip-moe --help`` starts fast.
"""

import argparse
import contextlib
import json
import logging
import os
from fnmatch import fnmatch
from pathlib import Path
from typing import Iterator

from mllm_encoder.atomic import check_output
from mllm_encoder.cli.model import add_assemble_arguments
from mllm_encoder.dmu.config import (
    DATA_INDEX,
    KMEANS_BACKENDS,
    METHODS,
    PRECISIONS,
    DataSection,
    DMUSection,
    EvalSection,
    RuntimeSection,
    StageSection,
    check_section,
    load_config,
    route_defaults,
)

logger = logging.getLogger(__name__)


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = DataSection()
    parser.add_argument("--data", required=True, help="training data: ShareGPT4V JSON, folder, CSV/TSV or tar shards")
    parser.add_argument("--format", default=defaults.format, help="data format (default: from the path)")
    parser.add_argument("--image-root", help="folder the image paths are relative to")
    parser.add_argument(
        "--allow-absolute-image-paths", action="store_true", help="accept absolute image paths in the data file"
    )
    parser.add_argument("--num-workers", type=int, default=defaults.num_workers, help="data-loader workers per process")
    parser.add_argument(
        "--max-bad-fraction",
        type=float,
        default=defaults.max_bad_fraction,
        help=f"stop above this bad-sample fraction (default {defaults.max_bad_fraction:g})",
    )
    parser.add_argument(
        "--index-dir",
        help="folder of the training data's index, built once and memory-mapped by every rank (default "
        "OUT/data_index); stages given the same folder reuse it while the data is unchanged",
    )


def _data_section(args: argparse.Namespace) -> DataSection:
    data = DataSection(
        train=args.data,
        format=args.format,
        image_root=args.image_root,
        allow_absolute_paths=args.allow_absolute_image_paths,
        max_bad_fraction=args.max_bad_fraction,
        num_workers=args.num_workers,
    )
    check_section(data, "flags")
    return data


def _add_training_arguments(parser: argparse.ArgumentParser, defaults: StageSection) -> None:
    runtime = RuntimeSection()
    parser.add_argument("--steps", type=int, help="optimizer steps (default: --epochs over the data)")
    parser.add_argument("--epochs", type=float, default=defaults.epochs, help="epochs when --steps is not given")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="per process and micro-step")
    parser.add_argument("--grad-accum", type=int, default=defaults.grad_accum, help="micro-steps per optimizer step")
    parser.add_argument("--lr", type=float, default=defaults.lr, help=f"peak learning rate ({defaults.lr:g})")
    parser.add_argument(
        "--weight-decay", type=float, default=defaults.weight_decay, help=f"AdamW decay ({defaults.weight_decay:g})"
    )
    parser.add_argument(
        "--warmup-steps", type=int, default=defaults.warmup_steps, help=f"linear warmup ({defaults.warmup_steps})"
    )
    parser.add_argument("--mixed-precision", default=runtime.mixed_precision, choices=PRECISIONS)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations")
    parser.add_argument("--save-every", type=int, default=runtime.save_every, help="save the training state every N")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(stage_defaults=defaults)


def _stage_sections(args: argparse.Namespace, **stage_overrides):
    stage = StageSection(
        **{
            **vars(args.stage_defaults),
            "steps": args.steps,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "grad_accum": args.grad_accum,
            "lr": args.lr,
            "weight_decay": args.weight_decay,
            "warmup_steps": args.warmup_steps,
            **stage_overrides,
        }
    )
    runtime = RuntimeSection(
        mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing,
        save_every=args.save_every,
    )
    check_section(stage, "flags")
    check_section(runtime, "flags")
    return stage, runtime


def _train(args: argparse.Namespace, labels, **stage_overrides) -> None:
    import numpy as np

    from mllm_encoder.dmu.accelerator import build_accelerator
    from mllm_encoder.dmu.resources import load_model
    from mllm_encoder.dmu.stages import epoch_plan, run_training, stage_training_data, steps_for, train_config

    _check_stage_output(args, "train", args.model, args.data, labels, args.image_root)
    index_dir = _checked_index_dir(args, args.model, args.data, labels, args.image_root)
    data = _data_section(args)
    stage, runtime = _stage_sections(args, **stage_overrides)
    accelerator = build_accelerator(runtime.mixed_precision)
    labels = np.load(labels) if labels is not None else None
    with stage_training_data(None, data, args.model, index_dir, accelerator) as training:
        plan = epoch_plan(
            stage, np.zeros(len(training), np.int64) if labels is None else labels, accelerator.num_processes
        )
        steps = steps_for(stage, plan)
        cfg = train_config(stage, runtime, steps, args.seed, data.num_workers)
        model = load_model(args.model)
        model_dir, history = run_training(
            model, data, args.model, labels, cfg, args.out, accelerator, training=training
        )
    if accelerator.is_main_process:
        print(f"{model_dir}: {steps} steps, final loss {history[-1]['loss']:.4f}")


def run_mcl(args: argparse.Namespace) -> None:
    _train(args, args.labels, trainable="ffn")


def run_route(args: argparse.Namespace) -> None:
    _train(args, None, trainable="ffn+router" if args.train_experts else "router", aux_loss_coef=args.aux_loss_coef)


def run_extract(args: argparse.Namespace) -> None:
    from mllm_encoder.dmu.accelerator import build_accelerator
    from mllm_encoder.dmu.stages import run_extract as extract

    _check_stage_output(args, "extract", args.model, args.data, args.image_root)
    index_dir = _checked_index_dir(args, args.model, args.data, args.image_root)
    data = _data_section(args)
    accelerator = build_accelerator(args.mixed_precision)
    print(extract(args.model, data, args.out, accelerator, args.batch_size, index_dir=index_dir))


def run_cluster(args: argparse.Namespace) -> None:
    from mllm_encoder.dmu.features import feature_files, feature_indices
    from mllm_encoder.dmu.stages import run_cluster as cluster

    _check_stage_output(args, "cluster", args.features, args.previous)
    clustering = DMUSection(
        image_clusters=args.image_clusters,
        text_clusters=args.text_clusters,
        kmeans_backend=args.backend,
        kmeans_sample_size=args.sample_size,
        kmeans_restarts=args.restarts,
        kmeans_tolerance=args.tolerance,
    )
    check_section(clustering, "flags")
    num_samples = args.num_samples or int(feature_indices(feature_files(args.features)).max(initial=-1)) + 1
    path = cluster(args.features, num_samples, args.out, args.previous, clustering, args.seed)
    print(json.dumps(json.loads((Path(args.out) / "cluster_sizes.json").read_text())), "->", path)


def run_eval(args: argparse.Namespace) -> None:
    from mllm_encoder.dmu.accelerator import build_accelerator
    from mllm_encoder.dmu.evaluation import evaluate_checkpoint

    section = EvalSection(
        data=args.data,
        format=args.format,
        image_root=args.image_root,
        split=args.split,
        attributes=args.attributes,
        batch_size=args.batch_size,
    )
    args.out = args.out or str(Path(args.model).resolve().parent / "eval")
    _check_stage_output(args, "eval", args.model, args.data, args.image_root, args.attributes)
    out = args.out
    metrics = evaluate_checkpoint(args.model, section, build_accelerator("no"), out)
    print(json.dumps(metrics, indent=2))


def run_pipeline_command(args: argparse.Namespace) -> None:
    """``clip-moe dmu run``: the config is validated in full before the launch is checked or anything runs."""
    config = load_config(args.config)
    if args.run_dir:
        config.run_dir = args.run_dir
    if args.method == "control" and config.eval.data is None:
        raise ValueError(f"{args.config}: --method control compares two models on held-out data; set eval.data")
    if args.method == "all" and config.eval.data is None:
        raise ValueError(
            f"{args.config}: --method all compares DMU, the baselines and the control on held-out data; set "
            "eval.data (or train DMU alone with --method dmu)"
        )

    from mllm_encoder.dmu.accelerator import build_accelerator
    from mllm_encoder.dmu.evaluation import format_results_table
    from mllm_encoder.dmu.pipeline import check_run_inputs, run_pipeline

    accelerator = build_accelerator(
        config.runtime.mixed_precision, config.runtime.find_unused_parameters, config.runtime.process_group_timeout_s
    )
    methods = list(METHODS) if args.method == "all" else [args.method]
    # the run directory, the base, the config against both and the data, before run_dir/run.log is written
    training = check_run_inputs(config, methods, args.config, accelerator, args.overwrite)
    try:
        with _logging_to(Path(config.run_dir) / "run.log", accelerator.is_main_process):
            for method in methods:
                run_pipeline(config, method, accelerator, where=args.config, config_file=args.config, training=training)
    finally:
        training.close()
    results_path = Path(config.run_dir) / "results.json"
    if accelerator.is_main_process:
        if results_path.exists():
            print(format_results_table(json.loads(results_path.read_text())))
        else:
            print(f"no evaluation data configured (eval.data), so no results.json; the stages are in {config.run_dir}")


def run_plan_command(args: argparse.Namespace) -> None:
    """``clip-moe dmu plan``: the run's stages, steps, disk and memory from the config and the data index."""
    config = load_config(args.config)
    if args.run_dir:
        config.run_dir = args.run_dir

    from mllm_encoder.dmu.plan import format_plan, plan_run

    print(format_plan(plan_run(config, args.method, args.world_size, where=args.config)))


@contextlib.contextmanager
def _logging_to(path: Path, is_main: bool) -> Iterator[None]:
    """Copy the log to ``path`` (main process) while the block runs; the handler is removed and closed after."""
    if not is_main:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def run_demo(args: argparse.Namespace) -> None:
    from mllm_encoder.experiments.demo import run_demo as demo
    from mllm_encoder.experiments.report import format_demo_table

    check_output(args.out, overwrite=args.overwrite, ours=_is_demo_directory, directory=True, what="a demo directory")
    if args.control_world:
        from mllm_encoder.experiments.control_world import run_control_world

        with _logging_to(Path(args.out) / "demo.log", True):
            verdict = run_control_world(args.out, args.control_world, quick=args.quick)["verdict"]
        print("\n".join(verdict))
        print(f"\nresults: {Path(args.out) / f'control_{args.control_world}' / 'control.json'}")
        return
    with _logging_to(Path(args.out) / "demo.log", True):
        results = demo(args.out, quick=args.quick)
    print(format_demo_table(results))
    print("\n".join(results["verdict"]))
    print(f"\nreport: {Path(args.out) / 'report.md'}   checkpoint: {Path(args.out) / 'clip-moe'}")


# What each stage command writes into its --out directory (a directory holding only these is ours).
STAGE_OUTPUTS = {
    "extract": ("features_rank*.safetensors", DATA_INDEX),
    "cluster": ("labels.npy", "cluster_sizes.json", "cluster_sizes.png"),
    "train": ("model", "train_state", "tensorboard", "history.json", "summary.json", DATA_INDEX),
    "eval": ("metrics.json", "expert_load.json", "expert_load.png"),
}


def _check_stage_output(args: argparse.Namespace, stage: str, *inputs) -> None:
    """The output rule for a stage command's ``--out`` (a directory of that stage's outputs is resumed/replaced)."""

    def ours(path: Path) -> bool:
        patterns = STAGE_OUTPUTS[stage]
        return all(
            entry.name.startswith(".") or any(fnmatch(entry.name, p) for p in patterns) for entry in path.iterdir()
        )

    check_output(
        args.out,
        inputs,
        args.overwrite,
        ours=ours,
        directory=True,
        what=f"an output of clip-moe dmu {args.dmu_command}",
    )


def _checked_index_dir(args: argparse.Namespace, *inputs) -> Path:
    """A stage command's ``--index-dir`` (default ``OUT/data_index``) under the output rule: absent, empty or a
    data index (never another folder, whatever ``--overwrite`` says), not one of ``inputs``, not ``--out``."""
    from mllm_encoder.dmu.resources import is_data_index

    index_dir = Path(args.index_dir) if args.index_dir else Path(args.out) / DATA_INDEX
    resolved, out = index_dir.resolve(), Path(args.out).resolve()
    if resolved == out or resolved in out.parents:
        raise ValueError(f"{index_dir}: the index folder is --out or holds it; give it its own folder")
    what = "a data index of clip-moe dmu (records/, shards/)"
    check_output(index_dir, inputs, ours=is_data_index, directory=True, what=what, foreign_replaceable=False)
    return index_dir


def _is_demo_directory(path: Path) -> bool:
    """A directory ``clip-moe demo`` wrote: its manifest (or a control world's), or only the log of a demo that
    stopped before writing one."""
    names = {entry.name for entry in path.iterdir()}
    return "demo_manifest.json" in names or any(path.glob("control_*/manifest.json")) or names <= {"demo.log"}


def _register_stages(dmu_commands) -> None:
    dmu_defaults = DMUSection()
    extract = dmu_commands.add_parser("extract", help="embed the training set with a model (sharded per rank)")
    extract.add_argument("--model", required=True, help="checkpoint directory")
    extract.add_argument("--out", required=True, help="features directory")
    extract.add_argument("--batch-size", type=int, default=dmu_defaults.extract_batch_size)
    extract.add_argument("--mixed-precision", default=RuntimeSection().mixed_precision, choices=PRECISIONS)
    _add_data_arguments(extract)
    extract.add_argument("--overwrite", action="store_true", help="write into a non-empty --out of other files")
    extract.set_defaults(func=run_extract)

    cluster = dmu_commands.add_parser("cluster", help="k-means image and text features into pseudo-labels")
    cluster.add_argument("--features", required=True, help="directory of features_rank*.safetensors")
    cluster.add_argument("--out", required=True, help="output directory (labels.npy, cluster sizes + plot)")
    cluster.add_argument("--previous", help="labels.npy of the previous stage, to accumulate")
    cluster.add_argument("--num-samples", type=int, help="dataset size (default: largest feature index + 1)")
    cluster.add_argument("--image-clusters", type=int, default=dmu_defaults.image_clusters)
    cluster.add_argument("--text-clusters", type=int, default=dmu_defaults.text_clusters)
    cluster.add_argument("--backend", default=dmu_defaults.kmeans_backend, choices=KMEANS_BACKENDS)
    cluster.add_argument(
        "--sample-size", type=int, default=dmu_defaults.kmeans_sample_size, help="samples the seeding fits on"
    )
    cluster.add_argument(
        "--restarts", type=int, default=dmu_defaults.kmeans_restarts, help="fits on the sample (least inertia kept)"
    )
    cluster.add_argument(
        "--tolerance",
        type=float,
        default=dmu_defaults.kmeans_tolerance,
        help="the passes over all samples stop once at most this fraction of labels changes (0: none)",
    )
    cluster.add_argument("--seed", type=int, default=0)
    cluster.add_argument("--overwrite", action="store_true", help="write into a non-empty --out of other files")
    cluster.set_defaults(func=run_cluster)

    mcl = dmu_commands.add_parser("mcl", help="one multistage-contrastive stage: FFNs on one-cluster batches")
    mcl.add_argument("--model", required=True, help="the dense base checkpoint to fine-tune")
    mcl.add_argument("--labels", required=True, help="labels.npy from `clip-moe dmu cluster`")
    mcl.add_argument("--out", required=True, help="stage directory (model/, train_state/, tensorboard/)")
    _add_data_arguments(mcl)
    _add_training_arguments(mcl, StageSection())
    mcl.add_argument("--overwrite", action="store_true", help="write into a non-empty --out of other files")
    mcl.set_defaults(func=run_mcl)

    assemble = dmu_commands.add_parser("assemble", help="N dense models -> N experts per layer (= clip-moe assemble)")
    add_assemble_arguments(assemble)

    route = dmu_commands.add_parser("route", help="tune the routers of an assembled CLIP-MoE")
    route.add_argument("--model", required=True)
    route.add_argument("--out", required=True)
    route.add_argument("--train-experts", action="store_true", help="train the experts too")
    route.add_argument(
        "--aux-loss-coef", type=float, default=route_defaults().aux_loss_coef, help="load-balancing loss weight"
    )
    _add_data_arguments(route)
    _add_training_arguments(route, route_defaults())
    route.add_argument("--overwrite", action="store_true", help="write into a non-empty --out of other files")
    route.set_defaults(func=run_route)


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``clip-moe dmu ...`` and ``clip-moe demo``."""
    dmu = commands.add_parser("dmu", help="Diversified Multiplet Upcycling: stages and the resumable pipeline")
    dmu_commands = dmu.add_subparsers(dest="dmu_command", required=True, metavar="STAGE")
    run = dmu_commands.add_parser("run", help="run or resume the whole pipeline from a YAML config")
    run.add_argument("config", help="YAML config (see configs/)")
    run.add_argument(
        "--method",
        default="dmu",
        choices=[*METHODS, "all"],
        help="DMU, a baseline at equal optimizer steps, or the stage-level control (MCL stage 1 on one-cluster vs "
        "random batches); default dmu",
    )
    run.add_argument("--run-dir", help="override the config's run_dir")
    run.add_argument("--overwrite", action="store_true", help="use a non-empty --run-dir that has no run manifest")
    run.set_defaults(func=run_pipeline_command)
    plan = dmu_commands.add_parser("plan", help="dry run: stages, steps, clusters, disk and memory of a config")
    plan.add_argument("config", help="YAML config (see configs/)")
    plan.add_argument("--method", default="dmu", choices=METHODS, help="the method to plan (default dmu)")
    plan.add_argument(
        "--world-size",
        type=int,
        default=int(os.environ.get("WORLD_SIZE", 1)),
        help="processes (GPUs) of the run (default: $WORLD_SIZE or 1)",
    )
    plan.add_argument("--run-dir", help="override the config's run_dir (its index and labels are read when present)")
    plan.set_defaults(func=run_plan_command)
    _register_stages(dmu_commands)

    evaluate = dmu_commands.add_parser("eval", help="retrieval R@K, per-attribute accuracy, router load")
    evaluate.add_argument("--model", required=True)
    evaluate.add_argument("--data", required=True, help="retrieval set (JSON/Karpathy/CSV/folder)")
    evaluate.add_argument("--format", default="auto")
    evaluate.add_argument("--image-root")
    evaluate.add_argument("--split", default="test", help="Karpathy split (default test)")
    evaluate.add_argument("--attributes", help="synthetic attributes file for per-attribute accuracy")
    evaluate.add_argument("--batch-size", type=int, default=EvalSection().batch_size)
    evaluate.add_argument("--out", help="output directory (default: eval/ next to MODEL)")
    evaluate.add_argument("--overwrite", action="store_true", help="write into a non-empty --out of other files")
    evaluate.set_defaults(func=run_eval)

    demo = commands.add_parser("demo", help="DMU vs fine-tuning vs sparse upcycling on synthetic data (CPU)")
    demo.add_argument("--quick", action="store_true", help="a tiny version for tests (< 60 s)")
    demo.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    demo.add_argument(
        "--overwrite", action="store_true", help="write into a non-empty --out that is not a demo directory"
    )
    demo.add_argument(
        "--control-world",
        choices=("audit", "suppressed", "seldom"),
        help="only the stage-level control, in a pre-registered marker world, into OUT/control_WORLD (docs/dmu.md)",
    )
    demo.set_defaults(func=run_demo)
