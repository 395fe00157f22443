"""bench/quality_smollm2.py's driver: side-by-side children get an equal share of the CPU threads
(the user's own setting wins), start --stagger-s apart, and the JSON records both. Real child
processes (each reports the thread count torch picked up); the recipe run is replaced by a child that
writes a metrics.json, so no model is loaded."""

from __future__ import annotations

import json
import sys

import pytest

from .conftest import load_script

CHILD = """
import json, os, sys, time
import torch
run = os.path.join(sys.argv[1], sys.argv[2])
os.makedirs(run, exist_ok=True)
seen = {"start": time.time(), "torch_threads": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS"),
        "mkl": os.environ.get("MKL_NUM_THREADS")}
json.dump(seen, open(os.path.join(run, "seen.json"), "w"))
json.dump({"wikitext2_ppl": {"float": 10.0 + int(sys.argv[3])}}, open(os.path.join(run, "metrics.json"), "w"))
"""


def _driver():
    return load_script("bench/quality_smollm2.py")


def test_children_get_a_share_of_the_threads_and_start_staggered(tmp_path, monkeypatch):
    driver = _driver()
    for name in driver.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(driver.os, "cpu_count", lambda: 5)  # 5 // 3 = 1 thread each (torch's default is more)
    runs, out = tmp_path / "runs", tmp_path / "out"

    def child(args, seed, overrides):
        return [sys.executable, "-c", CHILD, str(runs), f"{args.name}_s{seed}", str(seed)]

    monkeypatch.setattr(driver, "child_command", child)
    argv = ["quality_smollm2.py", "--recipe", "smollm2_codebook_best", "--seeds", "0,1,2", "--name", "q"]
    monkeypatch.setattr(sys, "argv", [*argv, "--stagger-s", "1.5", "--runs-dir", str(runs), "--out", str(out)])
    driver.main()

    seen = [json.loads((runs / f"q_s{s}" / "seen.json").read_text()) for s in range(3)]
    assert all(s["omp"] == "1" and s["mkl"] == "1" and s["torch_threads"] == 1 for s in seen), seen
    result = json.loads((out / "q.json").read_text())
    # The driver starts the children 1.5 s apart (when each child's Python is up varies with the load).
    starts = sorted(result["per_seed"][s]["starts"][0]["unix_time"] for s in ("0", "1", "2"))
    assert starts[1] - starts[0] >= 1.5 and starts[2] - starts[1] >= 1.5
    assert result["threads_per_run"] == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    assert result["stagger_s"] == 1.5 and result["wikitext2_ppl"]["float"]["mean"] == 11.0
    shared = ["data.teacher_seed=0", f"data.teacher_cache_dir={runs / 'teacher_text'}"]
    assert result["share_teacher"] is True and result["teacher_overrides"] == shared
    for s in ("0", "1", "2"):
        (start,) = result["per_seed"][s]["starts"]
        assert start["side_by_side"] == 3 and start["threads"] == result["threads_per_run"]


def test_the_user_s_thread_setting_wins_and_one_child_gets_every_core(monkeypatch):
    driver = _driver()
    monkeypatch.setattr(driver.os, "cpu_count", lambda: 16)
    assert driver.child_threads(3, {"OMP_NUM_THREADS": "2"}) == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "5"}
    assert driver.child_threads(1, {}) == {"OMP_NUM_THREADS": "16", "MKL_NUM_THREADS": "16"}
    assert driver.child_threads(40, {}) == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def test_share_teacher_gives_every_seed_one_teacher_sample_unless_turned_off(tmp_path):
    driver = _driver()
    runs = tmp_path / "runs"
    commands = {}
    for share in (True, False):
        args = driver.argparse.Namespace(share_teacher=share, runs_dir=str(runs), recipe="r", config=None, name="q")
        commands[share] = [driver.child_command(args, s, ["data.teacher_seed=4"]) for s in (0, 1)]
    cache = f"data.teacher_cache_dir={runs / 'teacher_text'}"
    for seed, cmd in enumerate(commands[True]):
        assert f"data.seed={seed}" in cmd and cache in cmd
        # The shared settings come before the command's own overrides, which win.
        assert cmd.index("data.teacher_seed=0") < cmd.index("data.teacher_seed=4")
    assert not any("teacher_cache_dir" in x or x == "data.teacher_seed=0" for c in commands[False] for x in c)


def test_train_one_at_a_time_gives_every_seed_one_lock(tmp_path):
    driver = _driver()
    runs = tmp_path / "runs"
    for flag in (True, False):
        args = driver.argparse.Namespace(
            share_teacher=False, train_one_at_a_time=flag, runs_dir=str(runs), recipe="r", config=None, name="q"
        )
        cmds = [driver.child_command(args, s, []) for s in (0, 1)]
        locks = [[x for x in c if x.startswith("trainer.train_lock=")] for c in cmds]
        assert locks == ([[f"trainer.train_lock={runs / 'train.lock'}"]] * 2 if flag else [[], []])


SLOW_CHILD = """
import json, os, sys, time
run = os.path.join(sys.argv[1], sys.argv[2])
os.makedirs(run, exist_ok=True)
start = time.time()
time.sleep(1.0)
json.dump({"start": start, "end": time.time(), "omp": os.environ.get("OMP_NUM_THREADS")},
          open(os.path.join(run, "seen.json"), "w"))
json.dump({"wikitext2_ppl": {"float": 10.0 + int(sys.argv[3])}}, open(os.path.join(run, "metrics.json"), "w"))
"""


def test_one_at_a_time_starts_each_run_after_the_last_has_ended_with_every_core(tmp_path, monkeypatch):
    """--one-at-a-time: the runs do not overlap (each child's start is after the previous child's
    end, by the children's own clocks), each gets all the cores, and the JSON says so."""
    driver = _driver()
    for name in driver.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(driver.os, "cpu_count", lambda: 6)
    runs, out = tmp_path / "runs", tmp_path / "out"

    def child(args, seed, overrides):
        return [sys.executable, "-c", SLOW_CHILD, str(runs), f"{args.name}_s{seed}", str(seed)]

    monkeypatch.setattr(driver, "child_command", child)
    argv = ["quality_smollm2.py", "--recipe", "smollm2_codebook_best", "--seeds", "0,1,2", "--name", "q"]
    monkeypatch.setattr(sys, "argv", [*argv, "--one-at-a-time", "--runs-dir", str(runs), "--out", str(out)])
    driver.main()

    seen = [json.loads((runs / f"q_s{s}" / "seen.json").read_text()) for s in range(3)]
    assert seen[1]["start"] >= seen[0]["end"] and seen[2]["start"] >= seen[1]["end"], seen
    assert all(s["omp"] == "6" for s in seen)
    result = json.loads((out / "q.json").read_text())
    assert result["one_at_a_time"] is True and result["wikitext2_ppl"]["float"]["n"] == 3
    assert all(result["per_seed"][s]["starts"][0]["side_by_side"] == 1 for s in ("0", "1", "2"))


def test_one_at_a_time_refuses_a_stagger(tmp_path, monkeypatch):
    driver = _driver()
    argv = ["quality_smollm2.py", "--recipe", "smollm2_codebook_best", "--one-at-a-time", "--stagger-s", "5"]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        driver.main()


def test_collect_reports_where_the_runs_computed_not_where_it_collects(tmp_path):
    driver = _driver()
    runs, out = tmp_path / "runs", tmp_path / "out"
    gpu = {"device": "NVIDIA H200 (CUDA 13.0)", "versions": {"torch": "2.11.0+cu130"}}
    for seed, ppl in ((0, 40.0), (1, 44.0)):
        (runs / f"q_s{seed}").mkdir(parents=True)
        metrics = {"wikitext2_ppl": {"recovered": ppl}, "environment": gpu, "stages": {"recover": {"seconds": 5.0}}}
        (runs / f"q_s{seed}" / "metrics.json").write_text(json.dumps(metrics))
        lock = {"trainer": {"train_lock": str(runs / "train.lock")}, "data": {"teacher_cache_dir": None}}
        (runs / f"q_s{seed}" / "run_config.yaml").write_text(json.dumps(lock))  # JSON is YAML
    args = driver.argparse.Namespace(
        out=str(out),
        runs_dir=str(runs),
        name="q",
        seeds=[0, 1],
        recipe="r",
        config=None,
        threads_per_run=None,
        stagger_s=0.0,
        one_at_a_time=False,
        share_teacher=False,
        train_one_at_a_time=False,
    )
    result = driver.collect(args, [])
    assert result["device"] == gpu["device"] and result["versions"] == gpu["versions"]
    assert result["collected_on"]["device"] == driver._device() != gpu["device"]
    assert result["wikitext2_ppl"]["recovered"]["mean"] == 42.0
    assert result["per_seed"]["1"]["environment"] == gpu
    # Collected without --train-one-at-a-time: the runs' own configs still say they had the lock.
    assert result["train_one_at_a_time"] is False
    assert {s: v["trainer.train_lock"] for s, v in result["as_run"].items()} == {
        "0": str(runs / "train.lock"),
        "1": str(runs / "train.lock"),
    }
    # Runs on two machines: both are named.
    other = {**gpu, "device": "NVIDIA H100 80GB HBM3 (CUDA 13.0)"}
    metrics = json.loads((runs / "q_s1" / "metrics.json").read_text())
    (runs / "q_s1" / "metrics.json").write_text(json.dumps({**metrics, "environment": other}))
    assert driver.collect(args, [])["device"] == [gpu["device"], other["device"]]
