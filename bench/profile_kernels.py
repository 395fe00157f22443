"""Hardware counters for the decode kernels (what bounds them), run under Nsight Compute:

    ncu --csv --metrics $(python bench/profile_kernels.py --metrics) --kernel-name 'regex:_cb_|_table_gemv_kernel' \\
        python bench/profile_kernels.py --provenance $OUT/provenance.json > $OUT/ncu.csv
    python bench/profile_kernels.py --summarize $OUT/ncu.csv --provenance $OUT/provenance.json \\
        --out bench/results/kernel_counters_h100.json

The script itself launches each kernel family once on 11008x4096 (after one launch to compile), on
weights that are not L2-resident (fresh random codes), so the counters describe one cold call. The
lookup-table matvec (lit_cb/kernels/table_gemv.py) is counted without its table build (a kernel of its own,
left out by the name filter): its sectors per request are what its design changes (about 14 expected against
the gemv's 24).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import pathlib
import sys

import torch

METRICS = {
    "gpu__time_duration.sum": "time_ns",
    "dram__bytes_read.sum": "dram_read_bytes",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "achieved_occupancy_pct",
    "launch__registers_per_thread": "registers_per_thread",
    "launch__occupancy_limit_registers": "occupancy_limit_registers_blocks",
    "smsp__sass_inst_executed_op_global_ld.sum": "global_load_instructions",
    "l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum": "l1_global_load_requests",
    "l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum": "l1_global_load_sectors",
    "l1tex__data_pipe_lsu_wavefronts_mem_lg_cmd_read.sum": "l1_global_load_wavefronts",
    "l1tex__t_sector_hit_rate.pct": "l1_sector_hit_rate_pct",
    "smsp__sass_inst_executed_op_shared_ld.sum": "shared_load_instructions",
    "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum": "shared_load_wavefronts",
    "smsp__inst_executed.sum": "instructions",
    "sm__cycles_elapsed.avg": "sm_cycles",
    "l1tex__throughput.avg.pct_of_peak_sustained_active": "l1_throughput_pct",
    "sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active": "lsu_pipe_pct",
}


def launch(provenance: str | None) -> None:
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from smollm2_h100 import provenance as describe

    if provenance:
        pathlib.Path(provenance).write_text(json.dumps(describe(sys.argv), indent=1))

    from lit_cb.kernels import codebook as K
    from lit_cb.kernels import ops

    n, k = 11008, 4096
    for name, (m, b, g), tokens, algo in [
        ("gemv 2x8_g8 T=1", (2, 8, 8), 1, "gemv"),
        ("gemv 1x8_g4 T=1", (1, 8, 4), 1, "gemv"),
        ("lut 2x8_g8 T=1", (2, 8, 8), 1, "lut"),
        ("mm 2x8_g8 T=16", (2, 8, 8), 16, "mm"),
    ]:
        for _ in range(2):  # the first call compiles; ncu sees both, the summary keeps the last
            codes = torch.randint(0, 2**b, (n, k // g, m), device="cuda").to(torch.uint8)
            codebooks = torch.randn(m, 2**b, 1, g, device="cuda", dtype=torch.float16) / math.sqrt(k)
            scales = torch.rand(n, 1, 1, 1, device="cuda", dtype=torch.float16) + 0.5
            x = torch.randn(tokens, k, device="cuda", dtype=torch.float16)
            ops.run_algo(x, codes, codebooks, scales, None, b, algo)
            torch.cuda.synchronize()
        print(name, "launched", file=sys.stderr)
    from lit_cb.kernels import table_gemv as T

    for name, (m, b, g) in [("table 1x8_g4 T=1", (1, 8, 4)), ("table 2x8_g8 T=1", (2, 8, 8))]:
        for _ in range(2):
            codes = T.interleave_codes(torch.randint(0, 2**b, (n, k // g, m), device="cuda").to(torch.uint8))
            codebooks = torch.randn(m, 2**b, 1, g, device="cuda", dtype=torch.float16) / math.sqrt(k)
            scales = torch.rand(n, 1, 1, 1, device="cuda", dtype=torch.float16) + 0.5
            x = torch.randn(1, k, device="cuda", dtype=torch.float16)
            T.table_gemv(x, codes, codebooks, scales, None, b)
            torch.cuda.synchronize()
        print(name, "launched", file=sys.stderr)
    del K


def summarize(path: str, provenance: str | None, out: str | None) -> None:
    text = pathlib.Path(path).read_text()
    start = text.index('"ID"')
    rows = list(csv.DictReader(io.StringIO(text[start:])))
    kernels: dict[str, dict] = {}
    for r in rows:
        key = f"{r['Kernel Name']}#{r['ID']}"
        kernels.setdefault(key, {"kernel": r["Kernel Name"], "id": int(r["ID"])})
        value = r["Metric Value"].replace(",", "")
        try:
            kernels[key][METRICS.get(r["Metric Name"], r["Metric Name"])] = float(value)
        except ValueError:
            pass  # "n/a": the counter does not exist on this GPU
    result = sorted(kernels.values(), key=lambda d: d["id"])
    for d in result:
        if d.get("time_ns"):
            d["dram_GBps"] = round(d.get("dram_read_bytes", 0) / d["time_ns"], 1)
        if d.get("l1_global_load_requests"):
            d["sectors_per_request"] = round(d["l1_global_load_sectors"] / d["l1_global_load_requests"], 2)
        if d.get("shared_load_instructions"):
            per_inst = d["shared_load_wavefronts"] / d["shared_load_instructions"]
            d["shared_wavefronts_per_instruction"] = round(per_inst, 2)
    doc = {**(json.loads(pathlib.Path(provenance).read_text()) if provenance else {}), "kernels": result}
    # the first launch of each family compiles it; keep the second (same shape, fresh data)
    doc["kernels"] = [d for i, d in enumerate(result) if i % 2 == 1]
    doc["shape"] = "11008x4096, fp16 activations, cold call (ncu flushes caches between kernels)"
    if out:
        pathlib.Path(out).write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc, indent=1))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--metrics", action="store_true", help="print the metric list for ncu --metrics")
    p.add_argument("--summarize", default=None, help="an ncu --csv output to turn into JSON")
    p.add_argument("--provenance", default=None, help="JSON with device, versions, date, command")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.metrics:
        print(",".join(METRICS))
    elif args.summarize:
        summarize(args.summarize, args.provenance, args.out)
    else:
        launch(args.provenance)


if __name__ == "__main__":
    main()
