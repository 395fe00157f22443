"""Run the README's CPU demo (``lit_cb run recipes/smollm2_codebook.py``) and record what it printed.

Writes a JSON with the command, date, machine (CPU model, usable cores, load average before the
run), versions, the wall time, the run's ``run_config.yaml`` and its ``metrics.json``;
``scripts/readme_figures.py --write`` then puts those figures into the README, and
``tests/test_readme.py`` fails while the README and the file disagree.

    python bench/cpu_demo.py --out bench/results/cpu_demo.json            # the demo, as a user runs it
    taskset -c 0,1 python bench/cpu_demo.py --out $OUT/cpu_demo.json      # two cores of a bigger machine
    python bench/cpu_demo.py --smoke --out /tmp/cpu_demo_smoke.json       # a few-minute check of this script
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "recipes/smollm2_codebook.py"
SMOKE = [
    "data.num_calibration_samples=2",
    "data.calibration_seqlen=64",
    "data.num_finetune_samples=8",
    "data.finetune_seqlen=64",
    "data.num_val_samples=1",
    "data.eval_seqlen=128",
    "data.max_eval_windows=1",
    "compression.method_config.kmeans_iters=1",
    "compression.method_config.codebook_update_steps=0",
    "compression.method_config.kmeans_max_points=256",
    "recovery.max_steps=2",
]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("lit_cb", "torch", "transformers", "lightning", "peft"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON to write")
    parser.add_argument("--smoke", action="store_true", help="tiny data sizes: checks this script in minutes")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides (recorded in the JSON)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists; refusing to overwrite it")
    overrides = [*(SMOKE if args.smoke else []), *args.overrides]
    with tempfile.TemporaryDirectory(prefix="lit_cb_cpu_demo_") as tmp:
        command = [sys.executable, "-m", "lit_cb.cli", "run", RECIPE, f"output_dir={tmp}", *overrides]
        load_before = os.getloadavg()
        started = datetime.datetime.now(datetime.UTC)
        t = time.perf_counter()
        subprocess.run(command, cwd=ROOT, check=True)
        wall = time.perf_counter() - t
        run_dir = Path(tmp) / "smollm2_codebook"
        record = {
            "command": f"lit_cb run {RECIPE}" + "".join(f" {o}" for o in overrides),
            "date": started.strftime("%Y-%m-%d"),
            "smoke": args.smoke,
            "machine": {
                "cpu": _cpu_model(),
                "cores": len(os.sched_getaffinity(0)),
                "load_average_before": [round(x, 2) for x in load_before],
                "load_average_after": [round(x, 2) for x in os.getloadavg()],
            },
            "versions": _versions(),
            "wall_seconds": wall,
            "run_config": yaml.safe_load((run_dir / "run_config.yaml").read_text()),
            "metrics": json.loads((run_dir / "metrics.json").read_text()),
        }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}: {wall / 60:.1f} min, perplexities {record['metrics']['wikitext2_ppl']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
