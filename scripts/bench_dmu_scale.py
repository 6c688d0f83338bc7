"""Time and peak memory of DMU's CPU-side components as the training set grows (issue 19; ``make bench-scale``).

Each component runs in a child process on synthetic data written under a temporary folder: its peak RSS is the
child's own (``os.wait4``), its seconds the timed section inside the child. Components:

- ``interpreter``: Python with torch and the DMU modules imported, nothing else (the floor of every row);
- ``extract``: :func:`mllm_encoder.dmu.features.extract_features` of one process over all N samples, a stand-in
  model making structured dim-D features (3 directions plus noise) from each sample's index;
- ``read``: every feature chunk of both modalities read back (:func:`mllm_encoder.dmu.features.iter_chunks`);
- ``cluster``: the whole cluster stage (:func:`mllm_encoder.dmu.stages.run_cluster`: k-means of both
  modalities, accumulation with a previous stage's labels, ``labels.npy`` and the report);
- ``index``: the training-set index of a ShareGPT4V JSON of N records, as a run builds it once in its run
  directory (:func:`mllm_encoder.data.build_record_index` with an ``index_dir``: streamed, memory-mapped).

Prints a table of seconds and peak RSS per component and N, the growth exponents (least-squares slope of
log value against log N over the sizes measured) and the figures at 10M pairs extrapolated from them.

    python scripts/bench_dmu_scale.py --sizes 100000 300000 1200000 3000000
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence

COMPONENTS = ("interpreter", "extract", "read", "cluster", "index")
TARGET = 10_000_000


class _Indices:
    """A dataset whose item ``i`` is ``i``: the stand-in model makes the features."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index


def _collate(items):
    import torch

    index = torch.tensor(items)
    return {"index": index, "pixel_values": index, "input_ids": index, "attention_mask": index}


def _synthetic_model(dim: int):
    import torch

    class Directions(torch.nn.Module):
        """Features of sample ``i``: direction ``i % 3`` of its modality (``2i % 3`` for text) plus a row of a
        fixed bank of Gaussian noise picked by ``i`` (cheap, so that the extraction's own work dominates)."""

        def __init__(self) -> None:
            super().__init__()
            generator = torch.Generator().manual_seed(0)
            self.centres = torch.randn(2, 3, dim, generator=generator)
            self.noise = 1.5 * torch.randn(2, 8191, dim, generator=generator)

        def _features(self, index, modality: int):
            rows = (index * (modality + 1) * 7919 + index // 8191) % 8191
            return self.centres[modality, (index * (modality + 1)) % 3] + self.noise[modality, rows]

        def get_image_features(self, pixel_values):
            return self._features(pixel_values, 0)

        def get_text_features(self, input_ids, attention_mask):
            return self._features(input_ids, 1)

    return Directions()


def build_index(path: Path) -> int:
    """The training-set index a run builds (once, into its run directory); returns its number of samples."""
    from mllm_encoder.data import build_record_index

    return len(build_record_index(path, index_dir=path.parent / "data_index"))


def _write_sharegpt4v(path: Path, n: int) -> None:
    with path.open("w") as handle:
        handle.write("[")
        for i in range(n):
            caption = f"a synthetic caption of image {i} with a few more words to make it a realistic length"
            conversations = [
                {"from": "human", "value": "<image>\nDescribe the image."},
                {"from": "gpt", "value": caption},
            ]
            handle.write(
                ("," if i else "")
                + json.dumps({"id": str(i), "image": f"images/{i:08d}.jpg", "conversations": conversations})
            )
        handle.write("]")


def run_component(name: str, n: int, work: Path, dim: int) -> float:
    """Run one component in this process; returns its seconds (the imports excluded)."""
    import numpy as np
    import torch

    from mllm_encoder.dmu.features import extract_features, feature_files, iter_chunks
    from mllm_encoder.dmu.stages import run_cluster

    started = time.perf_counter()
    if name == "extract":
        extract_features(_synthetic_model(dim), _Indices(n), _collate, work / "features", batch_size=1024)
    elif name == "read":
        rows = 0
        for index, chunk in iter_chunks(feature_files(work / "features")):
            assert all(torch.isfinite(values.float().sum()) for values in chunk.values())  # touches every value
            rows += len(index)
        assert rows == n, rows
    elif name == "cluster":
        run_cluster(work / "features", n, work / "clusters", work / "previous.npy", seed=0)
        assert int(np.load(work / "clusters" / "labels.npy").min()) >= 0
    elif name == "index":
        assert build_index(work / "train.json") == n
    return time.perf_counter() - started


def _measure(name: str, n: int, work: Path, dim: int) -> Dict[str, float]:
    """Run a component in a child process; its seconds and its own peak RSS in bytes."""
    command = [sys.executable, __file__, "--child", name, "--n", str(n), "--work", str(work), "--dim", str(dim)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        raise RuntimeError(f"component {name} at N={n} failed (status {status})")
    return {"seconds": json.loads(output.strip().splitlines()[-1])["seconds"], "peak_rss": usage.ru_maxrss * 1024}


def _prepare(n: int, work: Path, components: Sequence[str]) -> None:
    import numpy as np

    work.mkdir(parents=True, exist_ok=True)
    if "cluster" in components:
        np.save(work / "previous.npy", np.random.default_rng(0).integers(0, 9, n))
    if "index" in components:
        _write_sharegpt4v(work / "train.json", n)


def slope(sizes: Sequence[int], values: Sequence[float]) -> float:
    """Least-squares slope of log(value) against log(size): the growth exponent."""
    xs, ys = [math.log(s) for s in sizes], [math.log(max(v, 1e-9)) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def _table(results: Dict[str, Dict[int, Dict[str, float]]], sizes: List[int]) -> str:
    gb = 1e9
    floor = {n: results["interpreter"][n]["peak_rss"] for n in sizes} if "interpreter" in results else None
    head = ["component"] + [f"N={n:,}" for n in sizes] + ["time exp.", "memory exp.", f"{TARGET:,} (extrapolated)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, by_size in results.items():
        cells = []
        for n in sizes:
            above = (
                "" if floor is None or name == "interpreter" else f" (+{(by_size[n]['peak_rss'] - floor[n]) / gb:.2f})"
            )
            cells.append(f"{by_size[n]['seconds']:.1f} s / {by_size[n]['peak_rss'] / gb:.2f} GB{above}")
        seconds = [by_size[n]["seconds"] for n in sizes]
        memory = [by_size[n]["peak_rss"] - (floor[n] if floor and name != "interpreter" else 0) for n in sizes]
        time_exp, mem_exp = (slope(sizes, seconds), slope(sizes, memory)) if len(sizes) > 1 else (float("nan"),) * 2
        scale = TARGET / sizes[-1]
        estimate = f"~{seconds[-1] * scale**time_exp:.0f} s / +{memory[-1] * scale ** max(mem_exp, 0) / gb:.2f} GB"
        lines.append("| " + " | ".join([name, *cells, f"{time_exp:.2f}", f"{mem_exp:.2f}", estimate]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_200_000, 3_000_000])
    parser.add_argument("--components", nargs="+", default=list(COMPONENTS), choices=COMPONENTS)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--json", help="also write the measurements to this JSON file")
    parser.add_argument("--child", choices=COMPONENTS, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps({"seconds": run_component(args.child, args.n, Path(args.work), args.dim)}))
        return
    components = [name for name in COMPONENTS if name in args.components]
    if "read" in components or "cluster" in components:
        components = [name for name in COMPONENTS if name in components or name == "extract"]  # they need features
    results: Dict[str, Dict[int, Dict[str, float]]] = {name: {} for name in components}
    with tempfile.TemporaryDirectory(prefix="bench_dmu_scale_") as scratch:
        for n in args.sizes:
            work = Path(scratch) / f"n{n}"
            _prepare(n, work, components)
            for name in components:
                results[name][n] = _measure(name, n, work, args.dim)
                print(
                    f"N={n:,} {name}: {results[name][n]['seconds']:.1f} s, {results[name][n]['peak_rss'] / 1e9:.2f} GB",
                    flush=True,
                )
            shutil.rmtree(work)
    print(
        f"\nDMU CPU-side components, synthetic dim-{args.dim} features, {os.cpu_count()} CPU cores: "
        "seconds / peak RSS (+ above the interpreter)\n"
    )
    print(_table(results, list(args.sizes)))
    if args.json:
        Path(args.json).write_text(
            json.dumps({name: {str(n): v for n, v in by.items()} for name, by in results.items()}, indent=1)
        )


if __name__ == "__main__":
    main()
