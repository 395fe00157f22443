"""trainer.train_lock: runs sharing one GPU compress side by side and train one at a time."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lit_cb.config import load_config
from lit_cb.train_lock import TrainLock

from .conftest import TINY_RUN, tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def _hold(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.pwrite(fd, b"pid 1: the other run\n", 0)
    return fd


def test_acquire_waits_for_the_holder_and_says_who_it_is(tmp_path, caplog):
    path = tmp_path / "gpu.lock"
    other = _hold(path)
    lock = TrainLock(path, tmp_path / "run", poll_s=0.02)
    got = threading.Event()
    thread = threading.Thread(target=lambda: (lock.acquire(), got.set()))
    with caplog.at_level("INFO"):
        thread.start()
        time.sleep(0.3)
        assert not got.is_set()  # still waiting
        fcntl.flock(other, fcntl.LOCK_UN)
        os.close(other)
        thread.join(5)
    assert got.is_set() and lock.waited_s >= 0.3
    assert "held by pid 1: the other run" in caplog.text
    assert path.read_text() == f"pid {os.getpid()}: {tmp_path / 'run'}\n"
    # Held: a third party cannot take it; released: it can, and the file no longer names a holder.
    probe = os.open(path, os.O_RDWR)
    with pytest.raises(BlockingIOError):
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    lock.release()
    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(probe)
    assert path.read_text() == ""
    lock.release()  # a second release is a no-op


def test_bad_paths_are_refused_before_any_work(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match=r"trainer.train_lock=.*a_file/sub/gpu.lock.*a_file' is a file, not a folder"):
        TrainLock(tmp_path / "a_file" / "sub" / "gpu.lock", tmp_path)
    lock = TrainLock(tmp_path / "not_yet" / "gpu.lock", tmp_path)  # made when the lock is first taken
    lock.acquire()
    assert (tmp_path / "not_yet" / "gpu.lock").is_file()
    lock.release()
    with pytest.raises(ValueError, match=r"is a folder; give a file path"):
        TrainLock(tmp_path, tmp_path)
    with pytest.raises(ValueError, match=r"trainer.train_lock='' must be a file path or null"):
        load_config(None, ["trainer.train_lock=''"])
    with pytest.raises(ValueError, match=r"single-process runs .* trainer.devices=2 x trainer.num_nodes=1"):
        load_config(None, ["trainer.train_lock=/tmp/gpu.lock", "trainer.devices=2"])


RUN = {**TINY_RUN, "recovery.max_steps": 4, "eval.recovered": False}


def _run_in_subprocess(model_dir: Path, out: Path, **extra) -> subprocess.Popen:
    values = {**RUN, "output_dir": str(out), "model.name": str(model_dir), **extra}
    overrides = [f"{k}={v}" for k, v in values.items()]
    code = (
        "import json, sys\n"
        "from lit_cb.config import load_config\n"
        "from lit_cb.pipeline import run\n"
        "m = run(load_config(None, sys.argv[1:]))\n"
        "print('METRICS ' + json.dumps(m['stages']['recover'], default=str))\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, *overrides],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _recover_metrics(output: str) -> dict:
    (line,) = [ln for ln in output.splitlines() if ln.startswith("METRICS ")]
    return json.loads(line.removeprefix("METRICS "))


def test_a_run_compresses_then_waits_for_the_lock_and_trains_the_same(tmp_path, tiny_tokenizer):
    """A real run (its own process) with the lock held elsewhere: it compresses, waits before its first
    recovery step, trains once the lock is free, and saves the same model as a run without a lock."""
    model_dir = tmp_path / "model"
    tiny_llama(num_layers=2, vocab=len(tiny_tokenizer)).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    free = _run_in_subprocess(model_dir, tmp_path / "free")
    out_free, _ = free.communicate(timeout=600)
    assert free.returncode == 0, out_free[-3000:]

    path = tmp_path / "gpu.lock"
    other = _hold(path)
    locked = _run_in_subprocess(model_dir, tmp_path / "locked", **{"trainer.train_lock": str(path)})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(locked.stdout))
    reader.start()
    deadline = time.monotonic() + 600
    while not any("recovery waits for" in ln for ln in lines):
        assert locked.poll() is None, "".join(lines)[-3000:]
        assert time.monotonic() < deadline, "the run never reached the lock"
        time.sleep(0.2)
    assert (tmp_path / "locked" / "tiny" / "blocks").is_dir()  # compressed before waiting
    time.sleep(1.0)
    fcntl.flock(other, fcntl.LOCK_UN)
    os.close(other)
    locked.wait(timeout=600)
    reader.join(10)
    output = "".join(lines)
    assert locked.returncode == 0, output[-3000:]
    assert "held by pid 1: the other run" in output
    waited = _recover_metrics(output)["waited_for_train_lock_s"]
    assert waited >= 1.0
    assert path.read_text() == ""  # released at the end of training
    a = load_file(str(tmp_path / "free" / "tiny" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "locked" / "tiny" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
