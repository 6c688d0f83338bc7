"""Exclusive locks: a second writer is refused naming the holder, stale locks are taken over."""

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time

import pytest

from mllm_encoder.locking import LockError, directory_lock, file_lock, hold, is_stale


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _write_lock(path, pid, host=None, started=None, token="feedfacecafebeef", command="clip-moe dmu run x.yaml"):
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"pid": pid, "host": host or socket.gethostname(), "started": started, "command": command, "token": token}
    path.write_text(json.dumps(record))


def test_second_writer_is_refused_with_the_holder_named(tmp_path):
    with directory_lock(tmp_path / "run") as lock:
        record = json.loads((tmp_path / "run" / ".lock").read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(LockError, match=rf"run directory .*run is in use by pid {os.getpid()} on host "):
            directory_lock(tmp_path / "run").acquire()
        assert lock.holder.pid == os.getpid()
    assert not (tmp_path / "run" / ".lock").exists()
    with directory_lock(tmp_path / "run"):  # free again
        pass


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    answers = tmp_path / "answers.jsonl"
    _write_lock(tmp_path / "answers.jsonl.lock", _dead_pid())
    with file_lock(answers, "answer file") as lock:
        assert json.loads((tmp_path / "answers.jsonl.lock").read_text())["token"] == lock.holder.token
    assert "taking over the stale lock" in caplog.text


def test_reused_pid_is_stale_but_a_lock_on_another_host_is_not_broken(tmp_path):
    holder_path = tmp_path / "run" / ".lock"
    _write_lock(holder_path, os.getpid(), started="1")  # our pid, but a different process start time
    with directory_lock(tmp_path / "run"):
        pass
    _write_lock(holder_path, _dead_pid(), host="other-node-17")
    with pytest.raises(LockError, match=rf"on host other-node-17 .*delete {holder_path} if that process is gone"):
        directory_lock(tmp_path / "run").acquire()
    assert holder_path.exists()


def test_half_written_lock_is_waited_for_then_removed(tmp_path, monkeypatch):
    lock_path = tmp_path / "run" / ".lock"
    lock_path.parent.mkdir()
    lock_path.write_text("")  # created, holder not written yet
    monkeypatch.setattr("mllm_encoder.locking.TAKEOVER_TIMEOUT_S", 0.2)
    start = time.monotonic()
    with directory_lock(tmp_path / "run"):
        assert time.monotonic() - start >= 0.15
    assert not lock_path.exists()


def test_release_keeps_a_lock_that_another_process_took(tmp_path):
    lock = directory_lock(tmp_path).acquire()
    _write_lock(tmp_path / ".lock", os.getppid(), token="0123456789abcdef")
    lock.release()
    assert json.loads((tmp_path / ".lock").read_text())["token"] == "0123456789abcdef"


def test_hold_only_where_enabled(tmp_path):
    with hold(directory_lock(tmp_path), enabled=False) as lock:
        assert lock is None and not (tmp_path / ".lock").exists()
    with hold(directory_lock(tmp_path)) as lock:
        assert not is_stale(lock.holder) and (tmp_path / ".lock").exists()
    assert not (tmp_path / ".lock").exists()


def _contend(lock_dir, barrier, results):
    barrier.wait()
    try:
        with directory_lock(lock_dir):
            results.put("won")
            time.sleep(0.5)
    except LockError:
        results.put("refused")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_exactly_one_of_many_simultaneous_writers_wins(tmp_path):
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(4), context.Queue()
    processes = [context.Process(target=_contend, args=(tmp_path, barrier, results)) for _ in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    outcomes = sorted(results.get(timeout=5) for _ in processes)
    assert outcomes == ["refused"] * 3 + ["won"]
