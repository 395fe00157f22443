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
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the full config")
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
