"""GPU driver for the issue-4 comparison report on the embedded SmolLM2-135M (one H100).

    python bench/report_smollm2_h100.py [--out DIR] [key=value ...]

Runs ``configs/smollm2_report_full.yaml`` (every method, full protocol) into ``DIR/smollm2_report_full``
(``DIR`` defaults to ``$OUT``), then a round-to-nearest group-size sweep on the same loaded model and
windows (``rtn_group_sweep.json``), which shows which group size reproduces the reference RTN values
(3-bit 188.6, 4-bit 30.92). Copy ``report.json``, ``report.md`` and ``pareto.png`` into
``bench/results/report_smollm2_h100/``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from lit_cb.config import load_config
from lit_cb.report import ComparisonReport, ReportConfig

ROOT = Path(__file__).resolve().parents[1]
FULL_CONFIG = ROOT / "configs" / "smollm2_report_full.yaml"
SWEEP = [(bits, gs) for bits in (3, 4) for gs in (-1, 64, 192)]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "outputs"), help="output directory (default $OUT)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the RTN group-size sweep")
    parser.add_argument(
        "--add-runs",
        nargs="*",
        metavar="NAME=RUN_DIR",
        help="no GPU work: append rows of finished lit_cb runs (metrics.json + run_config.yaml) to the report "
        "already in --out/smollm2_report_full and re-render report.md and pareto.png",
    )
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the full config")
    args = parser.parse_args(argv)
    if args.add_runs:
        return add_runs(Path(args.out), args.add_runs, argv)
    cfg = load_config(FULL_CONFIG, [f"output_dir={args.out}", *args.overrides], cls=ReportConfig)
    t0 = time.perf_counter()
    report = ComparisonReport(cfg, command=" ".join(["python", "bench/report_smollm2_h100.py", *argv]))
    result = report.run()
    total = time.perf_counter() - t0
    print(f"[bench] report in {total:.0f} s -> {cfg.run_dir}", flush=True)
    for row in result["rows"]:
        print(f"  {row['method']:>12}  {row['bits_per_weight']:.3f} b/w  ppl {row['wikitext2_ppl']:.2f}", flush=True)
    if not args.no_sweep:
        sweep = []
        for bits, gs in SWEEP:
            variant = report.variant(rtn={**cfg.rtn, "group_size": gs})
            row = variant.run_scalar("rtn", bits)
            sweep.append({"bits": bits, "group_size": gs, **{k: row[k] for k in ("bits_per_weight", "wikitext2_ppl")}})
            print(f"[sweep] rtn {bits}-bit group {gs}: ppl {row['wikitext2_ppl']:.2f}", flush=True)
        (cfg.run_dir / "rtn_group_sweep.json").write_text(
            json.dumps({"reference": {"3": 188.6, "4": 30.92}, "rows": sweep}, indent=1)
        )
    print(f"[bench] total {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


def add_runs(out: Path, entries: list[str], argv: list[str]) -> int:
    """Append collected runs to an existing report (their own provenance stays in their metrics)."""
    from lit_cb.report import plot_pareto, render_markdown

    report_dir = out / "smollm2_report_full" if (out / "smollm2_report_full").is_dir() else out
    result = json.loads((report_dir / "report.json").read_text())
    cfg = load_config(FULL_CONFIG, [], cls=ReportConfig)
    collector = ComparisonReport.__new__(ComparisonReport)
    collector.config = cfg
    for entry in entries:
        result["rows"].extend(collector.collect_rows(entry))
    result.setdefault("added_runs", []).append(
        {"command": " ".join(["python", "bench/report_smollm2_h100.py", *argv]), "entries": entries}
    )
    (report_dir / "report.json").write_text(json.dumps(result, indent=1, default=str))
    (report_dir / "report.md").write_text(render_markdown(result))
    plot_pareto(result["rows"], report_dir / "pareto.png", title=f"{result['model']}: WikiText-2 perplexity")
    print(f"[bench] added {len(entries)} runs to {report_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
