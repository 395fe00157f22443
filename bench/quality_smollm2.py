"""Quality of a committed SmolLM2-135M config over several seeds, run side by side on one GPU (issue 14).

    source bench/device_setup.sh
    python bench/quality_smollm2.py --recipe smollm2_codebook_best --seeds 0,1,2 --budget-s 540 --out $OUT

Each seed is an ordinary recipe run (``python -m lit_cb.cli run recipes/<recipe>.py seed=S ...``),
started as its own process, all at once: a 135M model leaves most of an H100 idle, so three runs
side by side take far less than three times one. Run folders live under ``--runs-dir`` (outside
``$OUT``), so that when ``--budget-s`` runs out the runs are stopped with SIGINT (Lightning's
graceful shutdown: the crash checkpoint is written; compression resumes from its finished
blocks) and the same command, run again on the same machine, resumes them where they stopped.

When every run has finished, ``--out/<name>.json`` gets the per-seed values, their mean and
spread (sample standard deviation, min, max), each run's held-out curve and timings, with the
device, versions, date and the command. Each run's ``metrics.json``, curve and plot are copied to
``--out/<name>_runs/``. ``--collect`` only collects finished runs.

CPU threads: each child gets ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` = max(1, cpu_count // number
of children) unless they are set in the driver's environment (torch sizes its intra-op pool from
them). The JSON records them: ``threads_per_run`` for the runs this command started, and each run's
``starts`` (every start, resumes included, from ``--out/logs/<run>.starts.jsonl``).

Why, as measured on one H100 host with 16 CPU cores (this session): four runs started side by side,
each with torch's default of 16 intra-op threads (one per core) plus OpenMP's spin-waiting workers,
generated teacher text at about 1,000 tokens/s each (one batch of 128 x 2048 tokens took 4 min
20 s), so after 9.5 minutes only one batch per run was done, and the SIGINT at the budget's end lost
it (teacher text is now written batch by batch and resumes). In a second attempt, three runs side by
side compressed at 61 s per block where one run alone takes about 5 s. The suspected cause: 64
threads fighting over 16 cores, with the decode loop's per-token host syncs (torch.multinomial's
input checks, since removed from lit_cb.generate._pick) waiting behind them. ``--stagger-s N`` starts
the children N seconds apart, so their CPU-heavy set-up (model load, calibration data, CUDA graph
capture) does not coincide; the stagger counts against ``--budget-s``.

Compress together, train one at a time (``--train-one-at-a-time``): measured on the H200
(``bench/results/quality_attempt2_h200.json``), three runs side by side compressed at 13.2 s per block
each (15.7 alone) but recovered at 1.43 s per step each, 2.1 steps/s in all against 3.1 for one run
alone. With the flag every run gets ``trainer.train_lock=<runs-dir>/train.lock``
(``lit_cb/train_lock.py``): all start and compress at once, and each waits for the lock before its
first recovery step.

Teacher text (``--share-teacher``, on by default; ``--no-share-teacher`` turns it off): generating it
is the most expensive part of a run with 2M teacher tokens (640-730 tokens/s per process with 3 runs
and 3 other processes sharing one H200), and every seed used to generate its own. With the flag each
seed's run gets ``data.teacher_seed=0 data.teacher_cache_dir=<runs-dir>/teacher_text`` (before the
command's own overrides, which win): the first run to get there generates it under a file lock, the
others wait and load it (lit_cb/data/teacher_text.py). The seeds then still differ in calibration,
compression and data order (``seed``, ``data.seed``), but share one teacher sample, so the spread
over seeds no longer includes the teacher sample's. The JSON records ``share_teacher`` and the
overrides it added.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "triton", "transformers", "lightning", "peft"):
        try:
            out[name] = __import__(name).__version__
        except Exception as err:  # noqa: BLE001 (recorded, not fatal)
            out[name] = f"unavailable ({err})"
    return out


def _device() -> str:
    try:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001
        return "unknown"


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def child_threads(children: int, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The thread settings each of ``children`` side-by-side runs gets: the user's own where set,
    else an equal share of the cores (at least 1), so the children do not oversubscribe the CPU."""
    environ = os.environ if environ is None else environ
    share = str(max(1, (os.cpu_count() or 1) // max(1, children)))
    return {name: environ.get(name, share) for name in THREAD_VARIABLES}


def _pending(args) -> list[int]:
    """Seeds whose run has not finished (no metrics.json)."""
    return [s for s in args.seeds if not (Path(args.runs_dir) / f"{args.name}_s{s}" / "metrics.json").is_file()]


def teacher_overrides(args) -> list[str]:
    """The overrides ``--share-teacher`` gives every seed's run (none without it)."""
    if not args.share_teacher:
        return []
    return ["data.teacher_seed=0", f"data.teacher_cache_dir={Path(args.runs_dir) / 'teacher_text'}"]


def lock_overrides(args) -> list[str]:
    """The override ``--train-one-at-a-time`` gives every seed's run (none without it)."""
    if not getattr(args, "train_one_at_a_time", False):
        return []
    return [f"trainer.train_lock={Path(args.runs_dir) / 'train.lock'}"]


def child_command(args, seed: int, overrides: list[str]) -> list[str]:
    """The recipe run of one seed."""
    return [
        sys.executable,
        "-m",
        "lit_cb.cli",
        "run",
        str(ROOT / "recipes" / f"{args.recipe}.py"),
        *(["--config", str(ROOT / "configs" / f"{args.config}.yaml")] if args.config else []),
        f"seed={seed}",
        f"data.seed={seed}",
        f"run_name={args.name}_s{seed}",
        f"output_dir={args.runs_dir}",
        *teacher_overrides(args),
        *lock_overrides(args),
        *overrides,
    ]


def run_seeds(args, overrides: list[str]) -> dict[int, int | None]:
    """Start one run per unfinished seed (``--stagger-s`` apart; with ``--one-at-a-time`` each after
    the one before has ended), wait up to the budget, SIGINT what is still running."""
    procs: dict[int, subprocess.Popen] = {}
    logs = Path(args.out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    pending = _pending(args)
    together = 1 if args.one_at_a_time else len(pending)
    threads = child_threads(together)
    env = {**os.environ, **threads}
    print(
        f"{len(pending)} runs, {together} at a time, threads each: "
        + ", ".join(f"{k}={v}" for k, v in threads.items()),
        flush=True,
    )
    deadline = time.monotonic() + args.budget_s

    def wait_all() -> None:
        while procs and time.monotonic() < deadline and any(p.poll() is None for p in procs.values()):
            time.sleep(2)

    for seed in args.seeds:
        name = f"{args.name}_s{seed}"
        if seed not in pending:
            print(f"{name}: finished earlier", flush=True)
            continue
        if args.one_at_a_time:
            wait_all()
            if time.monotonic() >= deadline:
                print(f"{name}: not started, the budget is spent", flush=True)
                break
        elif procs and args.stagger_s > 0:
            time.sleep(min(args.stagger_s, max(0.0, deadline - time.monotonic())))
        cmd = child_command(args, seed, overrides)
        print("start:", shlex.join(cmd), flush=True)
        log = open(logs / f"{name}.log", "a")  # noqa: SIM115 (kept open for the child's lifetime)
        procs[seed] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        start = {
            "date": _now(),
            "unix_time": time.time(),
            "side_by_side": together,
            "threads": threads,
            "stagger_s": args.stagger_s,
        }
        with open(logs / f"{name}.starts.jsonl", "a") as f:  # each start of this seed's run (resumes too)
            f.write(json.dumps(start) + "\n")
    wait_all()
    for seed, p in procs.items():
        if p.poll() is None:
            print(f"seed {seed}: budget spent, stopping it (SIGINT) for a later resume", flush=True)
            p.send_signal(signal.SIGINT)
    for p in procs.values():
        try:
            p.wait(timeout=args.grace_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    args.threads_per_run = threads if procs else None
    return {seed: p.returncode for seed, p in procs.items()}


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _spread(values: list[float]) -> dict:
    if not values:
        return {}
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def _where_computed(per_seed: dict) -> dict:
    """``device`` and ``versions`` of the finished runs (one value each if they agree, else the list);
    this machine's when no run recorded its environment."""
    envs = [e["environment"] for e in per_seed.values() if e.get("finished") and e.get("environment")]
    if not envs:
        return {"device": _device(), "versions": _versions()}
    out = {}
    for key in ("device", "versions"):
        values = [env.get(key) for env in envs]
        out[key] = values[0] if all(v == values[0] for v in values) else values
    return out


def _as_run(copies: Path, per_seed: dict[str, dict]) -> dict:
    """The settings the driver's flags become, read back from each finished run's config."""
    import yaml

    seen: dict[str, dict] = {}
    for seed, entry in per_seed.items():
        cfg_file = copies / f"s{seed}" / "run_config.yaml"
        if entry.get("finished") and cfg_file.is_file():
            cfg = yaml.safe_load(cfg_file.read_text())
            seen[seed] = {
                "trainer.train_lock": cfg.get("trainer", {}).get("train_lock"),
                "data.teacher_cache_dir": cfg.get("data", {}).get("teacher_cache_dir"),
            }
    return seen


def collect(args, overrides: list[str]) -> dict:
    out = Path(args.out)
    copies = out / f"{args.name}_runs"
    per_seed: dict[str, dict] = {}
    for seed in args.seeds:
        run = Path(args.runs_dir) / f"{args.name}_s{seed}"
        metrics_file = run / "metrics.json"
        starts_file = Path(args.out) / "logs" / f"{args.name}_s{seed}.starts.jsonl"
        starts = (
            [json.loads(x) for x in starts_file.read_text().splitlines() if x.strip()] if starts_file.is_file() else []
        )
        if not metrics_file.is_file():
            per_seed[str(seed)] = {"finished": False, "starts": starts}
            continue
        m = json.loads(metrics_file.read_text())
        entry = {
            "finished": True,
            "wikitext2_ppl": m.get("wikitext2_ppl"),
            "bits_per_weight": m.get("bits_per_weight"),
            "bits_per_weight_recovered": m.get("bits_per_weight_recovered"),
            "stages": {k: v.get("seconds") if isinstance(v, dict) else v for k, v in m.get("stages", {}).items()},
            "environment": m.get("environment"),  # where the run computed (absent in runs before 2026-12-03)
        }
        for extra in ("recovery_curve.json", "bit_allocation.json"):
            if (run / extra).is_file():
                entry[extra.removesuffix(".json")] = json.loads((run / extra).read_text())
        entry["starts"] = starts
        per_seed[str(seed)] = entry
        dest = copies / f"s{seed}"
        dest.mkdir(parents=True, exist_ok=True)
        for f in ("metrics.json", "recovery_curve.json", "recovery_curve.png", "recovery.png", "run_config.yaml"):
            if (run / f).is_file():
                shutil.copy2(run / f, dest / f)
    summary: dict = {}
    for key in ("float", "compressed", "recovered"):
        vals = [e["wikitext2_ppl"][key] for e in per_seed.values() if e.get("finished") and key in e["wikitext2_ppl"]]
        summary[key] = _spread(vals)
    return {
        # The runs' own device and versions when they recorded them: this command may only collect
        # runs made elsewhere (a lent GPU's folders unpacked on a laptop).
        **_where_computed(per_seed),
        "collected_on": {"device": _device(), "versions": _versions()},
        "date": _now(),
        "command": "python " + shlex.join(sys.argv),
        "recipe": args.recipe,
        "config": args.config,
        "overrides": overrides,
        "seeds": args.seeds,
        "threads_per_run": args.threads_per_run,
        "stagger_s": args.stagger_s,
        "one_at_a_time": args.one_at_a_time,
        "share_teacher": args.share_teacher,
        "teacher_overrides": teacher_overrides(args),
        "train_one_at_a_time": getattr(args, "train_one_at_a_time", False),
        # What the runs themselves were given (their run_config.yaml): a --collect call need not
        # repeat the starting command's flags, so the two above may say less than the runs did.
        "as_run": _as_run(copies, per_seed),
        "wikitext2_ppl": summary,
        "per_seed": per_seed,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", required=True, help="a recipe name under recipes/, e.g. smollm2_codebook_best")
    ap.add_argument("--config", help="a config under configs/ instead of the recipe's default (smollm2_aqlm_full)")
    ap.add_argument("--seeds", default="0,1,2", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--name", help="result name (default: quality_<recipe>)")
    ap.add_argument("--budget-s", type=float, default=540.0, help="stop runs still going after this many seconds")
    ap.add_argument("--grace-s", type=float, default=45.0, help="time for a stopped run to write its checkpoint")
    ap.add_argument(
        "--stagger-s", type=float, default=0.0, help="start the runs this many seconds apart (default 0: all at once)"
    )
    ap.add_argument(
        "--one-at-a-time",
        action="store_true",
        help="start each seed's run when the one before has ended (a GPU-bound run gains nothing beside another)",
    )
    ap.add_argument(
        "--train-one-at-a-time",
        action="store_true",
        help="runs start together and compress side by side, then recover one at a time "
        "(trainer.train_lock=<runs-dir>/train.lock)",
    )
    ap.add_argument("--runs-dir", default="/tmp/lit_cb_quality")
    ap.add_argument(
        "--share-teacher",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="every seed shares one teacher sample: data.teacher_seed=0, cache in <runs-dir>/teacher_text (default)",
    )
    ap.add_argument("--out", required=True)
    ap.add_argument("--collect", action="store_true", help="only collect finished runs")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides for every seed")
    args = ap.parse_args()
    if not (ROOT / "recipes" / f"{args.recipe}.py").is_file():
        ap.error(f"--recipe {args.recipe!r}: no recipes/{args.recipe}.py")
    if args.config and not (ROOT / "configs" / f"{args.config}.yaml").is_file():
        ap.error(f"--config {args.config!r}: no configs/{args.config}.yaml")
    if not args.stagger_s >= 0:
        ap.error(f"--stagger-s {args.stagger_s}: must be >= 0")
    if args.one_at_a_time and args.train_one_at_a_time:
        ap.error(
            "--one-at-a-time already runs everything one at a time; --train-one-at-a-time is for runs started together"
        )
    if args.one_at_a_time and args.stagger_s:
        ap.error(f"--stagger-s {args.stagger_s} with --one-at-a-time: a stagger spaces runs that start together")
    args.name = args.name or f"quality_{args.recipe}"
    args.threads_per_run = None  # set by run_seeds when it starts runs; per_seed[...]["starts"] has each start
    Path(args.out).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if not args.collect:
        codes = run_seeds(args, args.overrides)
        print("exit codes:", codes, flush=True)
    result = collect(args, args.overrides)
    (Path(args.out) / f"{args.name}.json").write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result["wikitext2_ppl"], indent=1), flush=True)


if __name__ == "__main__":
    main()
