"""Issue 14 on the CPU: which sensitivity weighting makes mixed bits beat uniform bits, and does weighting each
layer's output rows by the float model's Fisher help the codebook itself?

Every variant is the CPU demo config (``configs/smollm2_codebook.yaml``: 16 x 512-token calibration windows,
4 WikiText-2 windows of 2048 tokens, 30 LoRA steps) at the same 2.056 bits/weight over the compressed
linears, compressed with ``lit_cb compress`` and then recovered with ``lit_cb recover``, so each pair of
rows differs in one setting only:

    uniform        g4 B8 everywhere (the demo)
    mixed_relative B 7/8/9 per layer, allocated by relative Hessian-weighted error (the H100's lora2_mixed)
    mixed_fisher   B 7/8/9 per layer, allocated by the Fisher-weighted error (estimated loss increase)
    rows_fisher    g4 B8 everywhere, each codebook fitted to the Fisher-weighted rows (compression.row_weighting)
    both_fisher    mixed_fisher + rows_fisher
    mixed_fisher_wide  B 6/7/8/9/10 per layer, allocated by the Fisher-weighted error

    python bench/cpu_weighting.py --runs-dir /tmp/cpu_weighting --out bench/results/cpu_weighting.json
    python bench/cpu_weighting.py --runs-dir DIR --collect --out ...   # only read finished runs

Runs that already finished in ``--runs-dir`` are not run again (the CLI resumes or refuses), so an
interrupted sweep continues where it stopped. About 7 minutes a variant on 2 cores. The demo protocol's
figures are not comparable with the H100 full protocol's; the comparison between rows is the point.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/smollm2_codebook.yaml"
MIXED = [
    "compression.bit_budget=2.056",
    "compression.bit_options=[{nbits: 7}, {nbits: 8}, {nbits: 9}]",
]
VARIANTS: dict[str, list[str]] = {
    "uniform": [],
    "mixed_relative": [*MIXED, "compression.sensitivity_weighting=relative"],
    "mixed_fisher": [*MIXED, "compression.sensitivity_weighting=fisher"],
    "rows_fisher": ["compression.row_weighting=fisher"],
    "both_fisher": [*MIXED, "compression.sensitivity_weighting=fisher", "compression.row_weighting=fisher"],
    "mixed_fisher_wide": [
        "compression.bit_budget=2.056",
        "compression.bit_options=[{nbits: 6}, {nbits: 7}, {nbits: 8}, {nbits: 9}, {nbits: 10}]",
        "compression.sensitivity_weighting=fisher",
    ],
}


def _command(stage: str, name: str, runs_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lit_cb.cli",
        stage,
        "--config",
        CONFIG,
        f"run_name={name}",
        f"output_dir={runs_dir}",
        *VARIANTS[name],
    ]


def _metrics(runs_dir: Path, name: str) -> dict | None:
    path = runs_dir / name / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _row(runs_dir: Path, name: str) -> dict:
    m = _metrics(runs_dir, name)
    if m is None:
        return {"finished": False, "overrides": VARIANTS[name]}
    ppl = m["wikitext2_ppl"]
    alloc = (m.get("compression_report") or {}).get("bit_allocation") or {}
    per_option: dict[str, int] = {}
    for j in (alloc.get("choice") or {}).values():
        per_option[f"option_{j}"] = per_option.get(f"option_{j}", 0) + 1
    return {
        "finished": "recovered" in ppl,
        "overrides": VARIANTS[name],
        "wikitext2_ppl": ppl,
        "bits_per_weight": m["bits_per_weight"],
        "bits_per_weight_recovered": m.get("bits_per_weight_recovered"),
        "layers_per_option": per_option or None,
        "compress_seconds": (m.get("stages") or {}).get("compress", {}).get("seconds"),
        "environment": m.get("environment"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs-dir", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    ap.add_argument("--collect", action="store_true", help="only read the finished runs in --runs-dir")
    args = ap.parse_args()
    names = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        ap.error(f"--variants {unknown} unknown; allowed: {list(VARIANTS)}")
    if not args.collect:
        for name in names:
            m = _metrics(args.runs_dir, name)
            if m is not None and "recovered" in m["wikitext2_ppl"]:
                continue
            for stage in ("compress", "recover"):
                subprocess.run(_command(stage, name, args.runs_dir), cwd=ROOT, check=True)
    rows = {name: _row(args.runs_dir, name) for name in names}
    envs = [r["environment"] for r in rows.values() if r.get("environment")]
    record = {
        "what": "CPU demo protocol at 2.056 bits: uniform vs mixed bits (relative / Fisher allocation) vs Fisher "
        "row weighting of each codebook; compressed and recovered WikiText-2 (4 windows)",
        "command": "python bench/cpu_weighting.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "config": CONFIG,
        "device": envs[0]["device"] if envs else None,
        "versions": envs[0]["versions"] if envs else None,
        "commands": {n: [" ".join(_command(s, n, args.runs_dir)[2:]) for s in ("compress", "recover")] for n in names},
        "variants": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    for name, r in rows.items():
        ppl = r.get("wikitext2_ppl") or {}
        comp, rec = ppl.get("compressed", float("nan")), ppl.get("recovered", float("nan"))
        print(f"{name:15s} compressed {comp:8.2f}  recovered {rec:8.2f}")


if __name__ == "__main__":
    main()
