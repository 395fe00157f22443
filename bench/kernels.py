"""Layer benchmark of lit_cb's Triton codebook kernels against fp16 cuBLAS, bitsandbytes NF4 and AQLM's
CUDA kernels (H100; CUDA-graph medians; weights rotated over enough copies to defeat the 50 MB L2).

    python bench/kernels.py --out bench/results/kernels_h100.json          # the full table
    python bench/kernels.py --sweep --shapes 11008x4096 --batches 1,16      # tile variants, for dispatch

Each timed region is one CUDA graph of ``R`` calls, call ``i`` on weight copy ``i % copies``; the reported
time is the median over replays of (graph time / R). Shapes are ``out x in``. Before timing, every kernel
variant is checked on the GPU against a float64 reference (fp16 and bf16 inputs).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import math
import os
import pathlib
import statistics
import sys
import traceback

import torch
import torch.nn.functional as F

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = ["4096x4096", "11008x4096", "4096x11008", "8192x8192", "28672x8192", "8192x28672"]
BATCHES = [1, 4, 16, 64, 2048]
FORMATS = {"2x8_g8": (2, 8, 8), "1x16_g8": (1, 16, 8), "1x8_g4": (1, 8, 4)}  # (M, B, g)
L2_BYTES = 50 * 2**20
ROTATE_BYTES = 4 * L2_BYTES  # each timed call reads weights that are not in L2


def ensure_kernels_package():
    """``lit_cb.kernels`` from ./kernels when the checkout is not pip-installed (the device machine)."""
    try:
        return importlib.import_module("lit_cb.kernels")
    except ModuleNotFoundError:
        spec = importlib.util.spec_from_file_location(
            "lit_cb.kernels", REPO / "kernels" / "__init__.py", submodule_search_locations=[str(REPO / "kernels")]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["lit_cb.kernels"] = module
        spec.loader.exec_module(module)
        import lit_cb

        lit_cb.kernels = module
        return module


def graph_time_us(fns: list, reps: int = 20) -> float:
    """Median per-call microseconds of a CUDA graph that runs every fn in ``fns`` once (rotation)."""
    for fn in fns[: min(len(fns), 3)]:
        fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns[: min(len(fns), 3)]:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(fns))
    del graph
    return statistics.median(times)


def copies_for(bytes_per_copy: int, cap: int = 48) -> int:
    return max(2, min(cap, math.ceil(ROTATE_BYTES / max(1, bytes_per_copy))))


def make_codebook_layers(n: int, k: int, m: int, b: int, g: int, copies: int, device="cuda"):
    code_dtype = torch.uint8 if b <= 8 else torch.int16
    layers = []
    for _ in range(copies):
        idx = torch.randint(0, 2**b, (n, k // g, m), device=device)
        codes = (torch.where(idx >= 2**15, idx - 2**16, idx) if b > 8 else idx).to(code_dtype)
        codebooks = torch.randn(m, 2**b, 1, g, device=device, dtype=torch.float16) / math.sqrt(k * m)
        scales = torch.rand(n, 1, 1, 1, device=device, dtype=torch.float16) + 0.5
        layers.append((idx, codes, codebooks, scales))
    return layers


def check_gpu(K, ops) -> list[str]:
    """Every algo and dtype vs a float64 reference on awkward shapes; returns failures."""
    failures = []
    torch.manual_seed(0)
    for m, b, g in [(2, 8, 8), (1, 16, 8), (1, 8, 4), (2, 12, 4), (2, 16, 8)]:
        for n, k in [(4096, 4096), (37, 520)]:
            idx, codes, codebooks, scales = make_codebook_layers(n, k, m, b, g, 1)[0]
            w = sum(codebooks.double()[mm, :, 0][idx[..., mm]] for mm in range(m)) * scales.double().reshape(n, 1, 1)
            w = w.reshape(n, k)
            bias = torch.randn(n, device="cuda", dtype=torch.float16)
            for dtype in (torch.float16, torch.bfloat16):
                for tokens in (1, 3, 17, 300):
                    x = torch.randn(tokens, k, device="cuda", dtype=dtype)
                    ref = x.double() @ w.T + bias.double()
                    for algo in ops.algos_for(b):
                        y = ops.run_algo(x, codes, codebooks, scales, bias, b, algo)
                        err = float((y.double() - ref).norm() / ref.norm())
                        tol = 3e-3 if dtype == torch.float16 else 2e-2
                        if not (err < tol):
                            failures.append(f"{m}x{b}_g{g} {n}x{k} {dtype} T={tokens} {algo}: rel err {err:.2e}")
    return failures


def bnb_setup(ws, dtype=torch.float16):
    import bitsandbytes as bnb
    import bitsandbytes.functional as BF

    packed = [BF.quantize_4bit(w, quant_type="nf4", blocksize=64) for w in ws]
    return [(lambda x, q=q, s=s: bnb.matmul_4bit(x, q.t(), quant_state=s)) for q, s in packed]


def load_aqlm():
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    os.environ.setdefault("MAX_JOBS", "16")
    from aqlm.inference_kernels import cuda_kernel  # noqa: F401  (JIT-compiles the CUDA kernels)

    return torch.ops.aqlm


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--sweep", action="store_true", help="time tile variants of every kernel family")
    p.add_argument("--sweep-families", default="gemv,lut,mm,dense", help="with --sweep: which families")
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--tune", action="store_true", help="pick gemv/mm/dense per format and batch first")
    p.add_argument("--dump-asm", default=None, help="folder for PTX/SASS of the compiled kernels")
    args = p.parse_args()

    ensure_kernels_package()
    from lit_cb.kernels import codebook as K
    from lit_cb.kernels import dispatch, ops

    from lit_cb.layers import CodebookFormat

    versions = {"torch": torch.__version__, "cuda": torch.version.cuda}
    import triton

    versions["triton"] = triton.__version__
    if not args.no_check:
        failures = check_gpu(K, ops)
        print("GPU correctness:", "all passed" if not failures else failures, flush=True)
    aqlm_ops = None
    if not args.no_baselines:
        try:
            import bitsandbytes

            versions["bitsandbytes"] = bitsandbytes.__version__
        except Exception as e:  # noqa: BLE001
            print("bitsandbytes unavailable:", e)
        try:
            import time

            t0 = time.time()
            aqlm_ops = load_aqlm()
            import aqlm

            versions["aqlm"] = getattr(aqlm, "__version__", "1.1.7")
            print(f"aqlm kernels compiled in {time.time() - t0:.0f} s", flush=True)
        except Exception:  # noqa: BLE001
            traceback.print_exc()

    tuned = tune(ops, dispatch, args.formats.split(",")) if args.tune else None
    rows = []
    sweep_rows = []
    for shape in args.shapes.split(","):
        n, k = map(int, shape.split("x"))
        fp16_copies = copies_for(n * k * 2, cap=8)
        ws = [torch.randn(n, k, device="cuda", dtype=torch.float16) / math.sqrt(k) for _ in range(fp16_copies)]
        nf4 = None
        if not args.no_baselines:
            try:
                nf4 = bnb_setup(ws[: copies_for(n * k // 2, cap=8)])
            except Exception:  # noqa: BLE001
                traceback.print_exc()
        for batch in map(int, args.batches.split(",")):
            x = torch.randn(batch, k, device="cuda", dtype=torch.float16)
            base = {}
            if not args.no_baselines:
                base["fp16_us"] = graph_time_us([lambda w=w, x=x: F.linear(x, w) for w in ws])
                if nf4 is not None:
                    try:
                        base["bnb_nf4_us"] = graph_time_us([lambda f=f, x=x: f(x) for f in nf4])
                    except Exception as e:  # noqa: BLE001
                        print("nf4 failed:", e)
            for fname in args.formats.split(","):
                m, b, g = FORMATS[fname]
                fmt = CodebookFormat(
                    in_features=k, out_features=n, in_group_size=g, num_codebooks=m, nbits_per_codebook=b
                )
                code_bytes = n * (k // g) * m * (1 if b <= 8 else 2)
                layers = make_codebook_layers(n, k, m, b, g, copies_for(code_bytes))
                algo = dispatch.choose_algo(fmt, batch)
                ours = graph_time_us(
                    [lambda L=L, x=x, b=b, a=algo: ops.run_algo(x, L[1], L[2], L[3], None, b, a) for L in layers]
                )
                row = {"shape": shape, "batch": batch, "format": fname, "algo": algo, "ours_us": round(ours, 2)}
                row.update({kk: round(v, 2) for kk, v in base.items()})
                moved = code_bytes + m * 2**b * g * 2 + batch * (k + n) * 2
                row["ours_GBps"] = round(moved / ours / 1e3, 1)
                row["ours_TFLOPs"] = round(2 * batch * n * k / ours / 1e6, 1)
                if aqlm_ops is not None and fname in ("2x8_g8", "1x16_g8") and batch <= 64:
                    try:
                        op = aqlm_ops.code2x8_matmat if fname == "2x8_g8" else aqlm_ops.code1x16_matmat
                        zb = torch.zeros(n, device="cuda", dtype=torch.float16)
                        aq = [(L[1].view(torch.int8) if b == 8 else L[1], L[2].contiguous(), L[3]) for L in layers]
                        row["aqlm_us"] = round(
                            graph_time_us([lambda a=a, x=x, op=op, zb=zb: op(x, a[0], a[1], a[2], zb) for a in aq]), 2
                        )
                    except Exception as e:  # noqa: BLE001
                        print("aqlm failed:", repr(e)[:300])
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.sweep:
                    families = tuple(args.sweep_families.split(","))
                    variants = [v for v in sweep_variants(K, batch, g, m, b) if v[0].startswith(families)]
                    for name, fn in variants:
                        try:
                            t = graph_time_us([lambda L=L, fn=fn, x=x, b=b: fn(x, L[1], L[2], L[3], b) for L in layers])
                        except Exception as e:  # noqa: BLE001
                            print(name, "failed", repr(e)[:200])
                            continue
                        sr = {
                            "shape": shape,
                            "batch": batch,
                            "format": fname,
                            "variant": name,
                            "us": round(t, 2),
                            "GBps": round(moved / t / 1e3, 1),
                        }
                        sweep_rows.append(sr)
                        print("  sweep", json.dumps(sr), flush=True)
                del layers
            torch.cuda.empty_cache()
        del ws, nf4
        torch.cuda.empty_cache()

    if args.dump_asm:
        dump_asm(K, args.dump_asm)
    props = torch.cuda.get_device_properties(0)
    result = {
        "device": f"{props.name}, {props.multi_processor_count} SMs",
        "versions": versions,
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join(sys.argv),
        "rows": rows,
    }
    if sweep_rows:
        result["sweep"] = sweep_rows
    if tuned:
        result["tune"] = tuned
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
    print(markdown_table(rows))


def sweep_variants(K, batch: int, g: int, m: int, b: int):
    """Tile variants per kernel family for this batch size (for tuning dispatch thresholds)."""
    out = []
    if batch <= 16 and K.LUT_MIN_NBITS <= b <= K.LUT_MAX_NBITS:
        for cols, bn, per_sm, warps in [
            (32, 128, 2, 4),
            (16, 128, 2, 4),
            (64, 128, 2, 8),
            (32, 256, 2, 8),
            (32, 64, 4, 4),
            (32, 128, 4, 4),
            (16, 256, 4, 4),
            (64, 64, 2, 4),
        ]:
            cfg = K.LutConfig(block_g=max(1, cols // m), block_n=bn, programs_per_sm=per_sm, num_warps=warps)
            out.append(
                (
                    f"lut_c{cols}_n{bn}_p{per_sm}_w{warps}",
                    lambda x, c, cb, s, b, cfg=cfg: K.codebook_lut_gemv(x, c, cb, s, None, b, cfg),
                )
            )
    if batch <= 16:
        for bn, bk, warps, stages in [(16, 256, 4, 3), (8, 1024, 8, 2), (4, 512, 4, 3), (32, 128, 4, 4)]:
            cfg = K.GemvConfig(block_n=bn, block_g=bk // g, num_warps=warps, num_stages=stages)
            out.append(
                (
                    f"gemv_n{bn}_k{bk}_w{warps}_s{stages}",
                    lambda x, c, cb, s, b, cfg=cfg: K.codebook_gemv(x, c, cb, s, None, b, cfg),
                )
            )
    mm = (
        [(16, 32, 256, 4, 3), (16, 64, 128, 4, 3), (16, 128, 64, 4, 4)]
        if batch <= 16
        else [(128, 128, 32, 4, 4), (128, 128, 64, 8, 3), (128, 256, 32, 8, 3)]
    )
    for bm, bn, bk, warps, stages in mm:
        for d2 in (False, True):
            cfg = K.MMConfig(
                block_m=bm, block_n=bn, block_g=max(1, bk // g), num_warps=warps, num_stages=stages, decode_2d=d2
            )
            out.append(
                (
                    f"mm{'2d' if d2 else ''}_m{bm}_n{bn}_k{bk}_w{warps}_s{stages}",
                    lambda x, c, cb, s, b, cfg=cfg: K.codebook_mm(x, c, cb, s, None, b, cfg),
                )
            )
    for bn, bg, warps in [(32, 32, 4), (8, 128, 4), (64, 16, 4), (16, 64, 8), (128, 8, 4)]:
        cfg = K.DequantConfig(block_n=bn, block_g=bg, num_warps=warps)
        out.append(
            (f"dense_n{bn}_g{bg}_w{warps}", lambda x, c, cb, s, b, cfg=cfg: K.codebook_dense(x, c, cb, s, None, b, cfg))
        )
    return out


def tune(ops, dispatch, formats: list[str], shape: str = "11008x4096", batches=(2, 4, 8, 16, 32, 64, 128)):
    """Time gemv / mm / dense per (format, batch) on one shape and install the winners in
    ``dispatch.ALGO_TABLE`` for the rest of the run; prints the table to hard-code in dispatch.py."""
    n, k = map(int, shape.split("x"))
    timings, table = [], {}
    for fname in formats:
        m, b, g = FORMATS[fname]
        code_bytes = n * (k // g) * m * (1 if b <= 8 else 2)
        layers = make_codebook_layers(n, k, m, b, g, copies_for(code_bytes))
        entries = [(1, "gemv")]
        for batch in batches:
            x = torch.randn(batch, k, device="cuda", dtype=torch.float16)
            res = {}
            for algo in ops.algos_for(b):
                if algo in ("gemv", "lut") and batch > 16:
                    continue
                res[algo] = graph_time_us(
                    [lambda L=L, x=x, b=b, a=algo: ops.run_algo(x, L[1], L[2], L[3], None, b, a) for L in layers]
                )
            best = min(res, key=res.get)
            timings.append({"format": fname, "batch": batch, **{a: round(t, 2) for a, t in res.items()}})
            print("tune", timings[-1], "->", best, flush=True)
            if entries[-1][1] == best:
                entries[-1] = (batch, best)
            else:
                entries.append((batch, best))
        table[f"{m}x{b}_g{g}"] = [e for e in entries if e[1] != "dense" or e is not entries[-1]]
        del layers
    dispatch.ALGO_TABLE.update(table)
    print("ALGO_TABLE =", dispatch.ALGO_TABLE, flush=True)
    return {"shape": shape, "timings": timings, "algo_table": {kk: list(v) for kk, v in table.items()}}


def dump_asm(K, directory: str) -> None:
    """PTX, SASS and register/spill counts of every compiled variant (read offline: vector widths, spills)."""
    path = pathlib.Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    summary = []
    for name in ("_cb_gemv_kernel", "_cb_mm_kernel", "_cb_dequant_kernel"):
        fn = getattr(K, name)
        for cache in getattr(fn, "device_caches", {}).values():
            for i, (key, kern) in enumerate(cache[0].items()):
                tag = f"{name}_{i}"
                summary.append(
                    {
                        "tag": tag,
                        "key": str(key)[:600],
                        "n_regs": getattr(kern, "n_regs", None),
                        "n_spills": getattr(kern, "n_spills", None),
                        "shared": getattr(kern.metadata, "shared", None),
                    }
                )
                for ext in ("ptx", "sass"):
                    try:
                        (path / f"{tag}.{ext}").write_text(kern.asm[ext])
                    except Exception as e:  # noqa: BLE001
                        print("asm", tag, ext, repr(e)[:100])
    (path / "summary.json").write_text(json.dumps(summary, indent=1))


def markdown_table(rows: list[dict]) -> str:
    head = "| shape | batch | format | algo | ours µs | fp16 µs | NF4 µs | AQLM µs | x fp16 | GB/s |"
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        speed = r.get("fp16_us", float("nan")) / r["ours_us"]
        lines.append(
            f"| {r['shape']} | {r['batch']} | {r['format']} | {r['algo']} | {r['ours_us']:.1f} | "
            f"{r.get('fp16_us', float('nan')):.1f} | {r.get('bnb_nf4_us', float('nan')):.1f} | "
            f"{r.get('aqlm_us', float('nan')):.1f} | {speed:.2f} | {r['ours_GBps']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
