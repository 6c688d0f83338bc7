"""Multi-process DMU runs on CPU (gloo): torchrun, accelerate launch, two "nodes" through the SLURM script,
a refused launch, and a kill mid-stage; each is compared with the single-process run at the same global batch.

What is equal: the global batches (every rank slices the same list), hence the cluster labels and the set of
samples per step. What may differ: float reduction order (features embedded in other batch compositions,
gradients averaged over ranks), so weights are compared at 1e-6 (measured: 5e-8).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file
from tiny_models import write_tiny_clip_base

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TIMEOUT = 600


@pytest.fixture(scope="module")
def setup(tmp_path_factory, dmu_tokenizer_dir):
    from mllm_encoder.data.synthetic import write_shapes_dataset

    root = tmp_path_factory.mktemp("distributed")
    base = write_tiny_clip_base(root / "base", dmu_tokenizer_dir)
    data = write_shapes_dataset(root / "data", num_train=64, num_eval=16, image_size=32, progress=False)
    return root, base, data


def _config(setup, name: str, batch_size: int) -> Path:
    root, base, data = setup
    stage = dict(steps=30, batch_size=batch_size, warmup_steps=1, lr=1e-3)
    values = {
        "base_model": str(base),
        "run_dir": str(root / name),
        "data": {"train": data["train"]},
        "dmu": {"num_experts": 2, "top_k": 2, "extract_batch_size": 16, "image_clusters": 2, "text_clusters": 1},
        "mcl": stage,
        "route": {**stage, "steps": 2},
        "runtime": {"save_every": 5, "log_every": 5, "mixed_precision": "no"},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def _env(**extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **extra}
    return {key: value for key, value in env.items() if key not in ("WORLD_SIZE", "RANK", "MASTER_ADDR")}


def _run(command, cwd=REPO, **env):
    result = subprocess.run(command, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _torchrun(nproc=2, port=29611):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port)]


def _dmu(config):
    return ["-m", "mllm_encoder", "dmu", "run", str(config)]


@pytest.fixture(scope="module")
def single(setup):
    config = _config(setup, "single", batch_size=8)
    _run([sys.executable, *_dmu(config)])
    return setup[0] / "single"


@pytest.fixture(scope="module")
def torchrun_two(setup):
    config = _config(setup, "torchrun", batch_size=4)
    _run([*_torchrun(), *_dmu(config)])
    return setup[0] / "torchrun"


def _assert_same_run(expected: Path, actual: Path, shards: int = 2) -> None:
    assert len(list((actual / "dmu" / "extract_0").glob("features_rank*.safetensors"))) == shards
    labels = [np.load(run / "dmu" / "cluster_0" / "labels.npy") for run in (expected, actual)]
    np.testing.assert_array_equal(labels[0], labels[1])
    for stage in ("dmu/mcl_1", "dmu/route"):
        a, b = (load_file(str(run / stage / "model" / "model.safetensors")) for run in (expected, actual))
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-6, err_msg=f"{stage}: {name}")


def test_torchrun_two_processes_equal_one_process(single, torchrun_two):
    _assert_same_run(single, torchrun_two)


def test_accelerate_launch_two_processes_equal_one_process(setup, single):
    config = _config(setup, "accelerate", batch_size=4)
    launch = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "29612"]
    _run([*launch, *_dmu(config)])
    _assert_same_run(single, setup[0] / "accelerate")


def test_two_nodes_through_the_slurm_script(setup, single, tmp_path):
    config = _config(setup, "slurm", batch_size=4)
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "scontrol").write_text("#!/usr/bin/env bash\necho 127.0.0.1\n")
    # srun: one task per node, each with its SLURM_NODEID, all at once (as SLURM runs them)
    (stubs / "srun").write_text(
        '#!/usr/bin/env bash\ncmd="${@: -1}"\npids=()\n'
        'for ((n = 0; n < SLURM_NNODES; n++)); do SLURM_NODEID=$n SLURM_STEP_ID=0 bash -c "$cmd" & pids+=($!); done\n'
        'status=0\nfor pid in "${pids[@]}"; do wait "$pid" || status=$?; done\nexit $status\n'
    )
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    env = dict(SLURM_NNODES="2", SLURM_JOB_NODELIST="node[0-1]", GPUS_PER_NODE="1", MAIN_PORT="29613")
    env["PATH"] = f"{stubs}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}"
    result = subprocess.run(
        ["bash", "scripts/dmu/slurm_multinode.sbatch", str(config)],
        cwd=REPO,
        env={**_env(), **env},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "process 1 of 2" in result.stderr
    _assert_same_run(single, setup[0] / "slurm")


def test_a_launch_that_starts_one_process_is_refused_and_writes_nothing(setup):
    config = _config(setup, "refused", batch_size=4)
    launch = [str(BIN / "accelerate"), "launch", "--cpu", "--num_processes", "2", *_dmu(config)]
    result = subprocess.run(launch, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("clip-moe dmu run: error:")]
    assert len(errors) == 1 and "starts only one process" in errors[0] and "torchrun" in errors[0]
    assert not (setup[0] / "refused").exists()


def test_a_kill_mid_stage_resumes_to_the_uninterrupted_result(setup, torchrun_two):
    config = _config(setup, "killed", batch_size=4)
    run_dir = setup[0] / "killed"
    command = [*_torchrun(port=29614), *_dmu(config)]
    process = subprocess.Popen(command, cwd=REPO, env=_env(), start_new_session=True, stderr=subprocess.DEVNULL)
    saved = run_dir / "dmu" / "mcl_1" / "train_state" / "step_00000010"
    deadline = time.monotonic() + TIMEOUT
    while not saved.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and both ranks, mid-stage
    process.wait()
    assert saved.exists()
    manifest = yaml.safe_load((run_dir / "manifest.json").read_text())["stages"]
    assert "dmu/cluster_0" in manifest and "dmu/mcl_1" not in manifest
    _run(command)
    _assert_same_run(torchrun_two, run_dir)
