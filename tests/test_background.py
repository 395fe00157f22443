"""bench/background.sh, which carries GPU jobs across short device calls: a started job outlives the
command that started it, `stop` interrupts it (a job started with bash's `&` would ignore SIGINT, so
neither `stop` nor the quality driver's budget could reach it), and `wait` packs logs and small run
files into $OUT/bg.tgz. Real processes, real signals, real tar."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "background.sh"

JOB = """
import json, os, sys, time
try:
    time.sleep(60)
except KeyboardInterrupt:
    with open(sys.argv[1] + ".tmp", "w") as f:
        json.dump({"interrupted": True}, f)
    os.replace(sys.argv[1] + ".tmp", sys.argv[1])  # whole, so the test never reads it half-written
    raise SystemExit(7)
"""


def _bg(env: dict, *args: str, timeout: float = 60) -> str:
    done = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_started_job_is_detached_stoppable_and_packed(tmp_path):
    bg, runs, out = tmp_path / "bg", tmp_path / "runs", tmp_path / "out"
    (runs / "r0").mkdir(parents=True)
    (runs / "r0" / "metrics.json").write_text(json.dumps({"wikitext2_ppl": {"float": 1.0}}))
    (runs / "r0" / "big.bin").write_bytes(b"x" * 1024)  # not a small run file: left out of the pack
    teacher = runs / "teacher_text" / "0123456789abcdef"
    teacher.mkdir(parents=True)
    (teacher / "tokens.safetensors").write_bytes(b"t" * (5 << 20))  # over the 4 MB limit: packed all the same
    (teacher / "meta.json").write_text("{}")
    (teacher / "lock").write_text("")
    out.mkdir()
    env = {**os.environ, "BG": str(bg), "RUNS": str(runs), "OUT": str(out)}
    marker = tmp_path / "interrupted.json"

    print(_bg(env, "start", "quick", sys.executable, "-c", "print('done quickly')"))
    print(_bg(env, "start", "slow", sys.executable, "-c", JOB, str(marker)))
    pid = int((bg / "slow.pid").read_text())
    assert os.getpgid(pid) == pid  # its own session: the starting command's end does not take it along

    status = _bg(env, "wait", "3")
    assert "== quick: ended rc=0" in status and "done quickly" in status
    assert "== slow: running" in status

    _bg(env, "stop", "slow")
    deadline = time.monotonic() + 20
    while not marker.is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert json.loads(marker.read_text()) == {"interrupted": True}  # SIGINT reached Python as KeyboardInterrupt

    status = _bg(env, "wait", "20")
    assert "== slow: ended" in status
    with tarfile.open(out / "bg.tgz") as tar:
        names = tar.getnames()
    assert any(n.endswith("r0/metrics.json") for n in names)
    assert any(n.endswith("quick.log") for n in names)
    assert not any(n.endswith("big.bin") for n in names)
    # the finished teacher text comes back whole, so a later session can carry it as .teacher/
    assert any(n.endswith("teacher_text/0123456789abcdef/tokens.safetensors") for n in names)
    assert any(n.endswith("teacher_text/0123456789abcdef/meta.json") for n in names)
    assert not any(n.endswith("/lock") for n in names)


def test_unknown_subcommand_is_refused(tmp_path):
    env = {**os.environ, "BG": str(tmp_path / "bg")}
    done = subprocess.run(["bash", str(SCRIPT), "launch"], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "usage:" in done.stderr
