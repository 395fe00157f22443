"""Prefill (many tokens) through the codebook formats: cuBLAS on a transient dense W, with the dequant run before
the product (``dense``, what the dispatcher ran so far), in row chunks one after the other, or in row chunks
on a side stream that cuBLAS overlaps (``codebook_dense_chunked``), against fp16 (issue 10's prefill target:
0.9x fp16 at 2048 tokens).

    python bench/prefill_bench.py --out $OUT/prefill_h100.json
    TRITON_INTERPRET=1 python bench/prefill_bench.py --smoke          # CPU, tiny shapes, no timing

Timing as bench/kernel_bench.py: a CUDA graph over weight copies rotated past the 50 MB L2, median of replays.
First a correctness check of every variant against a float64 reference on a ragged shape.
"""

# ruff: noqa: B023  (every lambda here is called within the loop iteration that makes it)
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import pathlib
import sys

import torch
import torch.nn.functional as F

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
FORMATS = {"2x8_g8": (2, 8, 8), "1x8_g4": (1, 8, 4)}  # (M, B, g)


def _load(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_weight(idx: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float64 ``W [N, K]``: row n, group j is ``scale_n * sum_m codebook_m[idx[n, j, m]]``."""
    n, groups, m = idx.shape
    cb = codebooks.double()[:, :, 0, :]  # [M, 2**B, G]
    w = sum(cb[i][idx[:, :, i]] for i in range(m))  # [N, groups, G]
    return w.reshape(n, -1) * scales.double().reshape(n, 1)


def variants(K, ops, n: int, k: int, g: int, b: int) -> dict:
    """name -> fn(x, codes, codebooks, scales)."""
    cfg = ops._dequant_config(n, k, g)
    v = {"dense": lambda x, c, cb, sc: ops.run_algo(x, c, cb, sc, None, b, "dense")}
    rows4 = 128 * math.ceil(n / 4 / 128)
    v["chunked4_in_turn"] = lambda x, c, cb, sc: K.codebook_dense_chunked(x, c, cb, sc, None, b, cfg, rows4, False)
    for chunks in (2, 4, 8):
        rows = 128 * math.ceil(n / chunks / 128)
        v[f"overlap{chunks}"] = lambda x, c, cb, sc, r=rows: K.codebook_dense_chunked(x, c, cb, sc, None, b, cfg, r)
    return v


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    p.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008,28672x8192", help="OUTxIN")
    p.add_argument("--tokens", default="512,2048")
    args = p.parse_args()
    bk = _load("bench_kernels", "kernel_bench.py")
    device = bk.bench_device(p, args)
    bk.ensure_kernels_package()
    from lit_cb.kernels import codebook as K
    from lit_cb.kernels import dispatch, ops

    what = "prefill: dense W + cuBLAS, in turn or with the dequant overlapped on a side stream, vs fp16"
    doc: dict = {**bk.result_header(what, args.smoke), "check": [], "rows": []}

    def flush() -> None:
        bk.write_json(args.out, doc)

    torch.manual_seed(0)
    ok = True
    with dispatch.interpreter_on_cpu(args.smoke), torch.no_grad():
        n, k, tokens = (37, 64, 9) if args.smoke else (1000, 1040, 300)
        for fname, (m, b, g) in FORMATS.items():
            idx, codes, codebooks, scales = bk.make_codebook_layers(n, k, m, b, g, 1, device)[0]
            x = torch.randn(tokens, k, device=device, dtype=torch.float16)
            ref = x.double() @ reference_weight(idx, codebooks, scales).T
            for name, fn in variants(K, ops, n, k, g, b).items():
                got = fn(x, codes, codebooks, scales).double()
                err = ((got - ref).abs().max() / ref.abs().max()).item()
                passed = err < 2e-3
                ok &= passed
                doc["check"].append({"format": fname, "variant": name, "max_rel_error": err, "passed": passed})
        print(json.dumps(doc["check"]), flush=True)
        flush()
        if args.smoke:
            doc["passed"] = ok
            flush()
            sys.exit(0 if ok else 1)
        for shape in args.shapes.split(","):
            n, k = (int(v) for v in shape.split("x"))
            copies = bk.copies_for(n * k * 2)
            dense = [torch.randn(n, k, device=device, dtype=torch.float16) * 0.02 for _ in range(copies)]
            for tokens in (int(t) for t in args.tokens.split(",")):
                x = torch.randn(tokens, k, device=device, dtype=torch.float16)
                fp16_us = bk.graph_time_us([lambda w=w: F.linear(x, w) for w in dense])
                for fname, (m, b, g) in FORMATS.items():
                    layers = bk.make_codebook_layers(n, k, m, b, g, bk.copies_for(n * k * 2 // 8), device)
                    row = {"shape": shape, "tokens": tokens, "format": fname, "fp16_us": round(fp16_us, 2)}
                    for name, fn in variants(K, ops, n, k, g, b).items():
                        us = bk.graph_time_us([lambda c=c, cb=cb, sc=sc: fn(x, c, cb, sc) for _, c, cb, sc in layers])
                        row[name] = {"us": round(us, 2), "x_fp16": round(fp16_us / us, 3)}
                    doc["rows"].append(row)
                    print(json.dumps(row), flush=True)
                    flush()
                    del layers
            del dense
            torch.cuda.empty_cache()
    doc["passed"] = ok
    flush()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
