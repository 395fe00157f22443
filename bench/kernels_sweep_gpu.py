"""One H100 run for issue 10 (decode kernels at 3x fp16): correctness of every new kernel path, then the
issue's layer shapes at batch 1 / 16 / 2048 for fp16, the previous kernels and each new variant, fused
q/k/v and gate/up against separate layers, the LLaMA-7B-shaped decode step with and without fusion, and
AQLM's CUDA 2x8 kernel (JIT-built in a background thread while the rest runs).

    python bench/kernels_sweep_gpu.py --out $OUT/kernels_sweep_h100.json            # at most about 7 minutes
    TRITON_INTERPRET=1 python bench/kernels_sweep_gpu.py --smoke --out /tmp/s.json  # CPU, tiny shapes

Timing as in bench/kernel_bench.py: one CUDA graph of calls over enough weight copies to defeat the 50 MB L2,
median over replays. Every variant runs in its own try: a failure (compile error, wrong result) is recorded
with its message and the run goes on; the JSON is rewritten after every row, so a timeout still leaves
everything measured so far. ``--budget-s`` skips the remaining phases (recorded) once that much time passed.
"""

# ruff: noqa: B023  (every lambda here is timed or called within the loop iteration that makes it)
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import pathlib
import shlex
import sys
import threading
import time
import traceback

import torch
import torch.nn.functional as F

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _load(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BK = _load("bench_kernels", "kernel_bench.py")  # graph timing, rotation, AQLM loader
BK.ensure_kernels_package()
from lit_cb.kernels import codebook as K  # noqa: E402
from lit_cb.kernels import dispatch, ops  # noqa: E402
from lit_cb.layers import CodebookFormat  # noqa: E402

FORMATS = {"2x8_g8": (2, 8, 8), "1x8_g4": (1, 8, 4)}  # (M, B, g): AQLM's 2-bit and LLM-Codebook's 2-bit


class Recorder:
    """The result document, rewritten to disk after every row."""

    def __init__(self, path: str | None, doc: dict) -> None:
        self.path, self.doc = path, doc

    def add(self, section: str, row: dict) -> None:
        self.doc.setdefault(section, []).append(row)
        print(section, json.dumps(row), flush=True)
        self.flush()

    def flush(self) -> None:
        if self.path:
            tmp = pathlib.Path(self.path + ".tmp")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self.doc, indent=1))
            os.replace(tmp, self.path)


def timer(smoke: bool):
    """``time_us(fns)``: CUDA-graph median on a GPU; two wall-clock calls under the CPU interpreter."""
    if not smoke:
        return BK.graph_time_us

    def wall(fns, reps=1):
        fns[0]()
        t0 = time.perf_counter()
        for fn in fns[:2]:
            fn()
        return (time.perf_counter() - t0) * 1e6 / min(2, len(fns))

    return wall


def layers_for(n, k, m, b, g, copies, device, parts=None):
    """Weight copies ``(codes, codebooks, scales)``; ``parts`` (row counts) stacks per-part codebooks."""
    out = []
    for _ in range(copies):
        codes = torch.randint(0, 2**b, (n, k // g, m), device=device).to(torch.uint8)
        if parts is None:
            cbs = torch.randn(m, 2**b, 1, g, device=device) / math.sqrt(k * m)
        else:
            cbs = torch.randn(len(parts), m, 2**b, 1, g, device=device) / math.sqrt(k * m)
        scales = torch.rand(n, 1, 1, 1, device=device) + 0.5
        out.append((codes, cbs.half(), scales.half()))
    return out


def dense_ref(codes, codebooks, scales, parts=None) -> torch.Tensor:
    """float64 W, written independently of the kernels (per-part codebooks by row)."""
    n, groups, m = codes.shape
    idx = codes.long()
    if parts is None:
        cb = codebooks.double()[:, :, 0, :][None].expand(n, -1, -1, -1)  # [n, M, 2**B, g]
    else:
        rows = torch.repeat_interleave(
            torch.arange(len(parts), device=codes.device), torch.tensor(parts).to(codes.device)
        )
        cb = codebooks.double()[:, :, :, 0, :][rows]  # [n, M, 2**B, g]
    w = 0
    for j in range(m):
        w = w + torch.gather(cb[:, j], 1, idx[:, :, j : j + 1].expand(-1, -1, cb.shape[-1]))
    return (w * scales.double().reshape(n, 1, 1)).reshape(n, groups * cb.shape[-1])


# --------------------------------------------------------------------------------------- the variants


def variants(batch: int, m: int, b: int, g: int, n: int, k: int, smoke: bool) -> dict:
    """name -> fn(x, codes, codebooks, scales): the previous kernels and the new candidates for this batch."""
    v = {}

    def gemv(bn, bk, w, s):
        cfg = K.GemvConfig(block_n=bn, block_g=max(1, bk // g), num_warps=w, num_stages=s)
        return lambda x, c, cb, sc: K.codebook_gemv(x, c, cb, sc, None, b, cfg)

    def mm(bm, bn, bk, w, s, split):
        cfg = K.MMConfig(block_m=bm, block_n=bn, block_g=max(1, bk // g), num_warps=w, num_stages=s, split_k=split)
        return lambda x, c, cb, sc: K.codebook_mm(x, c, cb, sc, None, b, cfg)

    if smoke:
        if batch <= 16:
            v["gemv(prev)"] = lambda x, c, cb, sc: ops.run_algo(x, c, cb, sc, None, b, "gemv")
            v["mm_split2"] = mm(16, 16, 16, 1, 1, 2)
        else:
            v["dense(prev)"] = lambda x, c, cb, sc: ops.run_algo(x, c, cb, sc, None, b, "dense")
            v["dense_chunked_r16"] = lambda x, c, cb, sc: K.codebook_dense_chunked(x, c, cb, sc, None, b, None, 16)
        return v
    if batch <= 2:
        v["gemv(prev)"] = gemv(8, 1024, 8, 2)  # what dispatch ran before (GemvConfig of ops._gemv_config)
        v["lut"] = lambda x, c, cb, sc: ops.run_algo(x, c, cb, sc, None, b, "lut")
        for bn, bk, w, s in [(4, 1024, 4, 2), (16, 512, 8, 2), (8, 2048, 8, 2), (2, 1024, 4, 3), (32, 256, 8, 2)]:
            v[f"gemv_n{bn}_k{bk}_w{w}_s{s}"] = gemv(bn, bk, w, s)
        # the floor: reading the codes once with a PyTorch reduction (HBM-bound), for "what bounds it"
        v["floor_read_codes_torch_sum"] = lambda x, c, cb, sc: c.reshape(-1).view(torch.int32).sum(dtype=torch.int32)
        for split in (4, 8, 16):  # tensor cores at one token (QTIP does): W decoded once, 15/16 of the MMA idle
            v[f"mm_m16_n32_k256_split{split}"] = mm(16, 32, 256, 4, 1, split)
    elif batch <= 64:
        v["mm(prev)"] = mm(16 if batch <= 16 else 64, 32 if batch <= 16 else 64, 256 if batch <= 16 else 128, 4, 1, 1)
        v["mm(new default)"] = lambda x, c, cb, sc: ops.run_algo(x, c, cb, sc, None, b, "mm")
        for bn, bk, w, split in [(32, 256, 4, 2), (32, 256, 4, 4), (32, 256, 4, 8), (64, 128, 4, 4), (16, 512, 4, 4)]:
            v[f"mm_m16_n{bn}_k{bk}_w{w}_split{split}"] = mm(16, bn, bk, w, 1, split)
        v["mm_m16_n64_k128_w4_s2"] = mm(16, 64, 128, 4, 2, 1)
        cfg2d = K.MMConfig(block_m=16, block_n=32, block_g=max(1, 256 // g), num_stages=1, decode_2d=True, split_k=4)
        v["mm2d_m16_n32_k256_w4_split4"] = lambda x, c, cb, sc: K.codebook_mm(x, c, cb, sc, None, b, cfg2d)
        v["dense"] = lambda x, c, cb, sc: ops.run_algo(x, c, cb, sc, None, b, "dense")
        if batch <= 16:
            v["gemv(prev)"] = gemv(8, 1024, 8, 2)
    else:
        prev = K.DequantConfig(8, 128, 4) if g <= 4 else K.DequantConfig(16, 64, 8)  # before this sweep
        v["dense(prev)"] = lambda x, c, cb, sc: K.codebook_dense(x, c, cb, sc, None, b, prev)
        v["dense(dispatch)"] = lambda x, c, cb, sc: ops.run_algo(x, c, cb, sc, None, b, "dense")
        for rows in (1024, 2048, 4096):
            v[f"dense_chunked_r{rows}"] = lambda x, c, cb, sc, r=rows: K.codebook_dense_chunked(
                x, c, cb, sc, None, b, ops._dequant_config(n, k, g), r
            )
        # dequant tiles by inputs per row segment: the previous config is 16x512 (g8) / 8x512 (g4); the gemv's
        # 8 rows x 1024 inputs decodes the same codewords 2.5x faster than this dequant did (kernels_h100.json)
        for bn, bk, w in [(8, 1024, 8), (4, 1024, 4), (16, 512, 8), (32, 256, 4), (2, 2048, 8), (8, 256, 4)]:
            cfg = K.DequantConfig(block_n=bn, block_g=max(1, bk // g), num_warps=w)
            v[f"dense_n{bn}_k{bk}_w{w}"] = lambda x, c, cb, sc, cfg=cfg: K.codebook_dense(x, c, cb, sc, None, b, cfg)
            v[f"dequant_only_n{bn}_k{bk}_w{w}"] = lambda x, c, cb, sc, cfg=cfg: K.codebook_dequant(
                c, cb, sc, b, x.dtype, cfg
            )
        v["dequant_only"] = lambda x, c, cb, sc: K.codebook_dequant(c, cb, sc, b, x.dtype, prev)
    return v


# ------------------------------------------------------------------------------------------- phases


def check(rec: Recorder, smoke: bool, device: str) -> None:
    """Every new path (fused parts, split-K, chunked dense, the new default configs) vs float64."""
    torch.manual_seed(0)
    # one ragged shape (rows and groups not multiples of any block): Triton specialises integer arguments
    # by divisibility, so more shapes would mostly add compile time
    cases = [(1000, 1040)] if not smoke else [(37, 64)]
    token_list = (1, 16, 300) if not smoke else (1, 17)
    dtypes = (torch.float16, torch.bfloat16) if not smoke else (torch.float16,)
    bf16_tokens = (16,)  # bf16 compiles every kernel again: one token count of it
    for fname, (m, b, g) in FORMATS.items():
        for n, k in cases:
            for parts in (None, [n - 2 * (n // 4), n // 4, n // 4]):
                (codes, cbs, scales) = layers_for(n, k, m, b, g, 1, device, parts)[0]
                w = dense_ref(codes, cbs, scales, parts)
                bias = torch.randn(n, device=device, dtype=torch.float16)
                for dtype in dtypes:
                    for tokens in token_list:
                        if dtype == torch.bfloat16 and (parts or tokens not in bf16_tokens):
                            continue
                        x = torch.randn(tokens, k, device=device, dtype=dtype)
                        ref = x.double() @ w.T + bias.double()
                        algos = ops.FUSED_ALGOS if parts else ops.algos_for(b)
                        paths = {a: (lambda a=a: ops.run_algo(x, codes, cbs, scales, bias, b, a, parts)) for a in algos}
                        cfg = K.MMConfig(block_m=16, block_n=32, block_g=max(1, 128 // g), num_stages=1, split_k=4)
                        paths["mm_split4"] = lambda cfg=cfg: K.codebook_mm(x, codes, cbs, scales, bias, b, cfg, parts)
                        for name, fn in paths.items():
                            row = {"format": fname, "shape": f"{n}x{k}", "parts": parts, "dtype": str(dtype)[6:]}
                            row.update({"tokens": tokens, "path": name})
                            try:
                                err = float((fn().double() - ref).norm() / ref.norm())
                                tol = 3e-3 if dtype == torch.float16 else 2e-2
                                row.update({"rel_err": err, "ok": bool(err < tol)})
                            except Exception as e:  # noqa: BLE001
                                row.update({"ok": False, "error": repr(e)[:400]})
                            if not row["ok"]:
                                rec.add("check_failures", row)
                            rec.doc["check_count"] = rec.doc.get("check_count", 0) + 1
    rec.doc.setdefault("check_failures", [])
    rec.flush()
    print("checks:", rec.doc["check_count"], "failures:", len(rec.doc["check_failures"]), flush=True)


def layer_phase(rec: Recorder, shapes, batches, smoke: bool, device: str, time_us, deadline: float) -> None:
    for shape in shapes:
        if time.time() > deadline:
            rec.doc["phases_skipped"].append(f"layers {shape}: time budget spent")
            continue
        n, k = map(int, shape.split("x"))
        fp16_copies = 1 if smoke else BK.copies_for(n * k * 2, cap=8)
        ws = [torch.randn(n, k, device=device, dtype=torch.float16) / math.sqrt(k) for _ in range(fp16_copies)]
        for batch in batches:
            x = torch.randn(batch, k, device=device, dtype=torch.float16)
            try:
                fp16 = time_us([lambda w=w, x=x: F.linear(x, w) for w in ws])
            except Exception as e:  # noqa: BLE001  (the CPU interpreter has no fp16 matmul on some builds)
                fp16 = float("nan")
                print("fp16 failed", repr(e)[:200])
            for fname, (m, b, g) in FORMATS.items():
                code_bytes = n * (k // g) * m
                layers = layers_for(n, k, m, b, g, 1 if smoke else BK.copies_for(code_bytes), device)
                for name, fn in variants(batch, m, b, g, n, k, smoke).items():
                    row = {"shape": shape, "batch": batch, "format": fname, "variant": name, "fp16_us": round(fp16, 2)}
                    try:
                        t = time_us([lambda L=L, fn=fn, x=x: fn(x, *L) for L in layers])
                        row.update({"us": round(t, 2), "x_fp16": round(fp16 / t, 3)})
                        row["code_GBps"] = round(code_bytes / t / 1e3, 1)
                    except Exception as e:  # noqa: BLE001
                        row["error"] = repr(e)[:400]
                        traceback.print_exc()
                    rec.add("layers", row)
                del layers
            if device == "cuda":
                torch.cuda.empty_cache()
        del ws


def fused_phase(rec: Recorder, batches, smoke: bool, device: str, time_us) -> None:
    """q/k/v (3 x 4096x4096) and gate/up (2 x 11008x4096): separate launches vs one fused launch."""
    groups = {"qkv": ([4096] * 3, 4096), "gate_up": ([11008] * 2, 4096)}
    if smoke:
        groups = {"qkv": ([32, 16, 16], 64), "gate_up": ([48, 48], 64)}
    for gname, (sizes, k) in groups.items():
        n = sum(sizes)
        for fname, (m, b, g) in FORMATS.items():
            code_bytes = n * (k // g) * m
            copies = 1 if smoke else BK.copies_for(code_bytes)
            fused = layers_for(n, k, m, b, g, copies, device, sizes)
            for batch in batches:
                x = torch.randn(batch, k, device=device, dtype=torch.float16)
                cf = CodebookFormat(
                    in_features=k, out_features=n, in_group_size=g, num_codebooks=m, nbits_per_codebook=b
                )
                algo = dispatch.choose_algo(cf, batch)
                row = {"group": gname, "parts": sizes, "format": fname, "batch": batch, "algo": algo}
                try:

                    def separate(L, x=x, algo=algo):
                        codes, cbs, scales = L
                        start = 0
                        for p, rows in enumerate(sizes):
                            sl = slice(start, start + rows)
                            ops.run_algo(x, codes[sl], cbs[p], scales[sl], None, b, algo)
                            start += rows

                    row["separate_us"] = round(time_us([lambda L=L: separate(L) for L in fused]), 2)
                    row["fused_us"] = round(
                        time_us([lambda L=L, x=x: ops.run_algo(x, *L, None, b, algo, sizes) for L in fused]), 2
                    )
                    row["speedup"] = round(row["separate_us"] / row["fused_us"], 3)
                except Exception as e:  # noqa: BLE001
                    row["error"] = repr(e)[:400]
                    traceback.print_exc()
                rec.add("fused", row)
            del fused


def decode_phase(rec: Recorder, batches, smoke: bool, device: str) -> None:
    D = _load("bench_decode_7b", "decode_7b.py")
    if smoke:  # a 2-block toy of the same code path, eager on the CPU
        D.HIDDEN, D.MLP, D.LAYERS, D.HEADS, D.VOCAB = 64, 128, 2, 4, 100
    for batch in batches:
        runs = [("fp16", D.fp16_linear, False)]  # unfused and fused builds draw the same weights (seed 0)
        # what bounds the step: everything but the 7 projections (attention, norms, embedding, fp16 lm_head)
        runs.append(("floor_no_projections", ZeroLinear, False))
        for fname in FORMATS:
            runs.append((fname, D.codebook_linear_factory(*FORMATS[fname], device=device), False))
            runs.append((fname + "+fused", D.codebook_linear_factory(*FORMATS[fname], device=device), True))
        fp16 = None
        for name, make, fuse in runs:
            row = {"batch": batch, "context": 128, "variant": name}
            try:
                if smoke:  # the PyTorch reference path (the fused phase runs the kernels in the interpreter)
                    with dispatch.interpreter_on_cpu(False):
                        tok_s = _smoke_decode(D, make, batch, fuse)
                else:
                    tok_s = D.decode_tok_s(make, batch, 128, fuse=fuse)
                row["tok_s"] = round(tok_s, 1)
                if name == "fp16":
                    fp16 = tok_s
                elif fp16 and not name.startswith("floor"):
                    row["x_fp16"] = round(tok_s / fp16, 3)
            except Exception as e:  # noqa: BLE001
                row["error"] = repr(e)[:400]
                traceback.print_exc()
            rec.add("decode_7b", row)


class ZeroLinear(torch.nn.Module):
    """A projection that costs one memset: the decode step's time without its linear layers."""

    def __init__(self, i: int, o: int) -> None:
        super().__init__()
        self.out_features = o

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def _smoke_decode(D, make, batch: int, fuse: bool) -> float:
    torch.manual_seed(0)
    model = D.Llama7BShaped(make, batch, 16).float().eval()
    if fuse:
        from lit_cb.fused import fuse_projections

        assert fuse_projections(model, D.FUSE_GROUPS) == 2 * D.LAYERS
    ids = torch.randint(0, D.VOCAB, (batch, 1))
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(ids, 4)
    return batch / (time.perf_counter() - t0)


def aqlm_phase(rec: Recorder, shapes, batches, time_us, aqlm_state: dict) -> None:
    """AQLM 1.1.7's CUDA 2x8 kernel (aqlm::code2x8_matmat) on the same shapes, once its JIT build is done."""
    thread = aqlm_state.get("thread")
    if thread is not None:
        thread.join(timeout=aqlm_state["wait_s"])
    if aqlm_state.get("ops") is None:
        reason = aqlm_state.get("error") or "the JIT build did not finish in time"
        rec.doc["aqlm_skipped"] = reason
        rec.flush()
        return
    op = aqlm_state["ops"].code2x8_matmat
    m, b, g = FORMATS["2x8_g8"]
    for shape in shapes:
        n, k = map(int, shape.split("x"))
        layers = layers_for(n, k, m, b, g, BK.copies_for(n * (k // g) * m), "cuda")
        zb = torch.zeros(n, device="cuda", dtype=torch.float16)
        for batch in batches:
            if batch > 64:
                continue
            x = torch.randn(batch, k, device="cuda", dtype=torch.float16)
            row = {"shape": shape, "batch": batch, "format": "2x8_g8"}
            try:
                fns = [lambda L=L, x=x: op(x, L[0].view(torch.int8), L[1], L[2], zb) for L in layers]
                row["aqlm_us"] = round(time_us(fns), 2)
            except Exception as e:  # noqa: BLE001
                row["error"] = repr(e)[:400]
            rec.add("aqlm", row)
        del layers
        torch.cuda.empty_cache()


def _start_aqlm_build(state: dict) -> None:
    def build():
        t0 = time.time()
        try:
            state["ops"] = BK.load_aqlm()
            import aqlm

            state["version"] = getattr(aqlm, "__version__", "unknown")
        except Exception as e:  # noqa: BLE001
            state["error"] = f"{type(e).__name__}: {e}"[:600]
        state["build_s"] = round(time.time() - t0, 1)

    state["thread"] = threading.Thread(target=build, daemon=True)
    state["thread"].start()


def summarize(doc: dict) -> dict:
    """Best variant per (shape, batch, format) and its speed against fp16 (and AQLM where measured)."""
    best: dict = {}
    for r in doc.get("layers", []):
        if "us" not in r or r["variant"].startswith(("dequant_only", "floor")):
            continue
        key = f"{r['shape']} b{r['batch']} {r['format']}"
        prev = [v for v in doc["layers"] if v.get("variant", "").endswith("(prev)") and "us" in v]
        prev = [v for v in prev if (v["shape"], v["batch"], v["format"]) == (r["shape"], r["batch"], r["format"])]
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = {"variant": r["variant"], "us": r["us"], "x_fp16": r.get("x_fp16")}
            if prev:
                best[key]["prev_us"] = prev[0]["us"]
    for r in doc.get("aqlm", []):
        key = f"{r['shape']} b{r['batch']} 2x8_g8"
        if key in best and "aqlm_us" in r:
            best[key]["aqlm_us"] = r["aqlm_us"]
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    p.add_argument("--shapes", default="11008x4096,28672x8192,4096x4096,4096x11008")
    p.add_argument("--batches", default="1,16,2048")
    # the decode step first (the headline), the long layer sweep last but AQLM (whose build runs meanwhile)
    p.add_argument("--phases", default="check,decode,fused,layers,aqlm")
    p.add_argument(
        "--budget-s", type=float, default=300.0, help="skip phases (and layer shapes) that would start after this"
    )
    p.add_argument("--aqlm-wait-s", type=float, default=45.0, help="how long the AQLM phase waits for its build")
    args = p.parse_args()
    t_start = time.time()
    device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--smoke needs TRITON_INTERPRET=1 (the kernels run in Triton's CPU interpreter)")
        args.shapes, args.batches = "48x64,32x128", "1,20"
    elif not torch.cuda.is_available():
        sys.exit("no GPU: use --smoke (with TRITON_INTERPRET=1) on a CPU")
    import triton

    doc = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter, smoke)",
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__},
        "gluon_shared_gather": _has_gluon_smem_gather(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "timing": "CUDA-graph median per call over weight copies rotated past the 50 MB L2 (bench/kernel_bench.py)",
        "phases_skipped": [],
    }
    rec = Recorder(args.out, doc)
    rec.flush()
    phases = args.phases.split(",")
    aqlm_state: dict = {"wait_s": args.aqlm_wait_s}
    if "aqlm" in phases and not args.smoke:
        _start_aqlm_build(aqlm_state)
    shapes, batches = args.shapes.split(","), [int(v) for v in args.batches.split(",")]
    time_us = timer(args.smoke)
    with dispatch.interpreter_on_cpu(args.smoke):
        for phase in phases:
            if time.time() - t_start > args.budget_s and phase != "aqlm":  # AQLM: short, and the baseline
                doc["phases_skipped"].append(f"{phase}: time budget {args.budget_s:.0f} s spent")
                rec.flush()
                continue
            t0 = time.time()
            try:
                if phase == "check":
                    check(rec, args.smoke, device)
                elif phase == "layers":
                    layer_phase(rec, shapes, batches, args.smoke, device, time_us, t_start + args.budget_s)
                elif phase == "fused":
                    fused_phase(
                        rec,
                        [v for v in batches if v <= 16] + [2048 if not args.smoke else 20],
                        args.smoke,
                        device,
                        time_us,
                    )
                elif phase == "decode":
                    decode_phase(rec, [1, 16] if not args.smoke else [1, 2], args.smoke, device)
                elif phase == "aqlm":
                    if args.smoke:
                        doc["aqlm_skipped"] = "smoke run (no GPU)"
                    else:
                        aqlm_phase(rec, shapes[:2], batches, time_us, aqlm_state)
                        doc["versions"]["aqlm"] = aqlm_state.get("version")
                        doc["aqlm_build_s"] = aqlm_state.get("build_s")
                else:
                    raise ValueError(f"unknown phase {phase!r}")
            except Exception as e:  # noqa: BLE001
                doc.setdefault("phase_errors", {})[phase] = repr(e)[:600]
                traceback.print_exc()
            doc.setdefault("phase_seconds", {})[phase] = round(time.time() - t0, 1)
            rec.flush()
    doc["summary"] = summarize(doc)
    doc["total_seconds"] = round(time.time() - t_start, 1)
    rec.flush()
    print(json.dumps(doc["summary"], indent=1))


def _has_gluon_smem_gather() -> bool:
    """Whether this Triton's Gluon can gather from shared memory (triton >= 3.7-ish); recorded, not used."""
    try:
        from triton.experimental.gluon import language as gl

        return hasattr(gl.shared_memory_descriptor, "gather")
    except Exception:  # noqa: BLE001
        return False


if __name__ == "__main__":
    main()
