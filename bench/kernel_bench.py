"""Layer benchmark of lit_cb's Triton codebook kernels, as the dispatcher runs them, against fp16 cuBLAS,
bitsandbytes NF4 and AQLM's CUDA kernels in the same run (H100; CUDA-graph medians; weights rotated over
enough copies to defeat the 50 MB L2), plus fused q/k/v and gate/up against separate launches.

    python bench/kernel_bench.py --out $OUT/kernels_h100.json                    # about 2 minutes on the H100
    python bench/kernel_bench.py --sweep --shapes 11008x4096 --batches 1,16      # tile variants, for dispatch
    TRITON_INTERPRET=1 python bench/kernel_bench.py --smoke --out /tmp/k.json     # CPU, tiny shapes
    python bench/kernel_bench.py --smem --batches 1,16 --no-baselines --no-fused --out $OUT/smem.json  # issue 10
    compute-sanitizer --tool racecheck python bench/kernel_bench.py --smem-check-only   # its barriers, first

Each row runs ``dispatch.choose_algo``'s family with ``ops.kernel_config``'s tile (recorded in the row) and
is timed as one CUDA graph of ``R`` calls, call ``i`` on weight copy ``i % copies``; the reported time is the
median over replays of (graph time / R). Shapes are ``out x in``. Before timing, every kernel family and
each shape class's tiles are checked on the GPU against a float64 reference (fp16 and bf16 inputs). AQLM's
kernels JIT-build in a background thread meanwhile and are timed last on the 2x8 rows up to 64 tokens.

``--smem`` adds the shared-memory-table gemv prototype (lit_cb/kernels/smem_table.py, what
``LIT_CB_SMEM_TABLES=1`` dispatches) to every row of at most 2 tokens in a format it takes: first checked
against the dense dequantized float32 matmul on that row's own layer (``smem_rel_err``; a failure is recorded
as ``smem_error`` and the variant is not timed), then timed like ``ours`` (``smem_us``, ``x_fp16_smem``,
``smem_vs_ours``, with its shared-memory plan). Rows of 3-64 tokens get its tensor-core variant
(lit_cb/kernels/smem_mm.py, the opt-in ``mm`` family), checked and timed the same way (``smem_mm_rel_err``,
``smem_mm_error``, ``smem_mm_us``, ``x_fp16_smem_mm``, ``smem_mm_vs_ours``, ``smem_mm_plan``). ``--smem-sweep``
also checks and times a few tile / copy / residency variants per row (``smem_variants``, ``smem_mm_variants``).
Before all rows, ``smem_check`` runs ragged shapes, bias and bf16 through the opt-in dispatcher path, at 1-2
tokens (gemv) and 4, 16, 40 tokens (mm).
"""

# ruff: noqa: B023  (every lambda here is timed or called within the loop iteration that makes it)
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import importlib.util
import json
import math
import os
import pathlib
import shlex
import statistics
import sys
import threading
import time
import traceback

import torch
import torch.nn.functional as F

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# the issue-10 shapes (LLaMA-7B o/q/k/v, gate/up, down; the 70B MLP) and token counts (decode, batched
# decode, prefill), as in bench/results/kernels_sweep_h100.json
SHAPES = ["4096x4096", "11008x4096", "4096x11008", "28672x8192"]
BATCHES = [1, 16, 2048]
FORMATS = {"2x8_g8": (2, 8, 8), "1x16_g8": (1, 16, 8), "1x8_g4": (1, 8, 4)}  # (M, B, g)
DEFAULT_FORMATS = ["2x8_g8", "1x8_g4"]  # AQLM's 2-bit and LLM-Codebook's 2-bit
L2_BYTES = 50 * 2**20
ROTATE_BYTES = 4 * L2_BYTES  # each timed call reads weights that are not in L2


GRAPH_TIMING = "CUDA-graph median per call over weight copies rotated past the 50 MB L2 (bench/kernel_bench.py)"


def result_header(what: str, smoke: bool) -> dict:
    """The fields every kernel bench's JSON opens with: what it measures, the device, the versions, the date, the
    command and how it timed (``smoke``: the CPU interpreter, no timing)."""
    import triton

    return {
        "what": what,
        "device": "cpu (Triton interpreter, smoke)" if smoke else torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__},
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "timing": "none (smoke: checks the code path only)" if smoke else GRAPH_TIMING,
    }


def bench_device(parser, args) -> str:
    """The checks a kernel bench with ``--out`` and ``--smoke`` makes before any work, and its device: an existing
    ``--out`` is refused (nothing is overwritten), ``--smoke`` needs the Triton interpreter, the rest a GPU."""
    if args.out and pathlib.Path(args.out).exists():
        parser.error(f"--out {args.out} exists; choose another path (nothing is overwritten)")
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--smoke needs TRITON_INTERPRET=1 (the kernel runs in Triton's CPU interpreter)")
        return "cpu"
    if not torch.cuda.is_available():
        sys.exit("no GPU: use --smoke (with TRITON_INTERPRET=1) on a CPU")
    return "cuda"


def write_json(path: str | None, doc: dict) -> None:
    """``doc`` to ``path`` (if given), whole: benches call it after every row, so a cut-off run keeps its rows."""
    if path:
        pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(path).write_text(json.dumps(doc, indent=1) + "\n")


def ensure_kernels_package():
    """``lit_cb.kernels`` (inside the package since transformers 5.25 imports a top-level ``kernels``)."""
    return importlib.import_module("lit_cb.kernels")


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


def check_gpu(K, ops, formats: list[str], device: str = "cuda", smoke: bool = False) -> list[str]:
    """Every algo on a ragged shape, and each shape class's dispatch tiles (ops.kernel_config at the class's
    measured shape) on a small one, vs a float64 reference; fp16 everywhere, bf16 at 16 tokens. Returns failures."""
    failures = []
    torch.manual_seed(0)
    class_shapes = {"narrow": (4096, 11008), "wide": (11008, 4096), "huge": (28672, 8192)}
    n, k = (37, 64) if smoke else (1000, 1040)
    token_list = (1, 17) if smoke else (1, 16, 300)
    for fname in formats:
        m, b, g = FORMATS[fname]
        idx, codes, codebooks, scales = make_codebook_layers(n, k, m, b, g, 1, device)[0]
        w = sum(codebooks.double()[mm, :, 0][idx[..., mm]] for mm in range(m)) * scales.double().reshape(n, 1, 1)
        w = w.reshape(n, k)
        bias = torch.randn(n, device=device, dtype=torch.float16)
        for dtype in (torch.float16,) if smoke else (torch.float16, torch.bfloat16):
            for tokens in token_list:
                if dtype == torch.bfloat16 and tokens != 16:
                    continue
                x = torch.randn(tokens, k, device=device, dtype=dtype)
                ref = x.double() @ w.T + bias.double()
                paths = {
                    a: (lambda a=a: ops.run_algo(x, codes, codebooks, scales, bias, b, a)) for a in ops.algos_for(b)
                }
                algo = "gemv" if tokens == 1 else "mm" if tokens <= 16 else "dense"
                launch = {"gemv": K.codebook_gemv, "mm": K.codebook_mm, "dense": K.codebook_dense}[algo]
                for cls, (cn, ck) in class_shapes.items():
                    cfg = ops.kernel_config(algo, tokens, cn, ck, g, m, num_sms=132)
                    paths[f"{algo}[{cls} tile]"] = lambda f=launch, cfg=cfg: f(
                        x, codes, codebooks, scales, bias, b, cfg
                    )
                for name, fn in paths.items():
                    try:
                        err = float((fn().double() - ref).norm() / ref.norm())
                    except Exception as e:  # noqa: BLE001
                        failures.append(f"{fname} {n}x{k} {dtype} T={tokens} {name}: {e!r}"[:400])
                        continue
                    tol = 3e-3 if dtype == torch.float16 else 2e-2
                    if not (err < tol):
                        failures.append(f"{fname} {n}x{k} {dtype} T={tokens} {name}: rel err {err:.2e}")
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


def read_all(codes: torch.Tensor) -> torch.Tensor:
    """Read every code byte once (as int32 words where they tile): the HBM floor of any kernel that must."""
    flat = codes.reshape(-1).view(torch.uint8)
    words = flat.view(torch.int32) if flat.numel() % 4 == 0 else flat
    return words.sum(dtype=torch.int32)


def wall_time_us(fns: list, reps: int = 1) -> float:
    """``--smoke`` stand-in for :func:`graph_time_us` on the CPU interpreter: wall clock of a couple of calls."""
    fns[0]()
    t0 = time.perf_counter()
    for fn in fns[:2]:
        fn()
    return (time.perf_counter() - t0) * 1e6 / min(2, len(fns))


def _start_aqlm_build(state: dict) -> threading.Thread:
    """AQLM's CUDA kernels JIT-compile (about 20 s on the H100 machine) in a thread while our rows run."""

    def build():
        t0 = time.time()
        try:
            state["ops"] = load_aqlm()
            import aqlm

            state["version"] = getattr(aqlm, "__version__", "unknown")
        except Exception as e:  # noqa: BLE001
            state["error"] = f"{type(e).__name__}: {e}"[:600]
        state["build_s"] = round(time.time() - t0, 1)

    thread = threading.Thread(target=build, daemon=True)
    thread.start()
    return thread


def _fused_rows(ops, dispatch, CodebookFormat, formats, batches, device, time_us, smoke) -> list[dict]:
    """q/k/v (3 x 4096x4096) and gate/up (2 x 11008x4096) of LLaMA-7B as separate layers vs one fused launch,
    each through the dispatcher's algo and tiles."""
    groups = {"qkv": ([4096] * 3, 4096), "gate_up": ([11008] * 2, 4096)}
    if smoke:
        groups = {"qkv": ([32, 16, 16], 64), "gate_up": ([48, 48], 64)}
    rows = []
    for gname, (sizes, k) in groups.items():
        n = sum(sizes)
        for fname in formats:
            m, b, g = FORMATS[fname]
            copies = 1 if smoke else copies_for(n * (k // g) * m)
            layers = []
            for _ in range(copies):
                codes = torch.randint(0, 2**b, (n, k // g, m), device=device).to(torch.uint8 if b <= 8 else torch.int16)
                cbs = torch.randn(len(sizes), m, 2**b, 1, g, device=device, dtype=torch.float16) / math.sqrt(k * m)
                layers.append((codes, cbs, torch.rand(n, 1, 1, 1, device=device, dtype=torch.float16) + 0.5))
            for batch in batches:
                x = torch.randn(batch, k, device=device, dtype=torch.float16)
                fmt = CodebookFormat(
                    in_features=k, out_features=n, in_group_size=g, num_codebooks=m, nbits_per_codebook=b
                )
                algo = dispatch.choose_algo(fmt, batch)

                def separate(L, x=x, algo=algo, b=b):
                    start = 0
                    for p, part in enumerate(sizes):
                        sl = slice(start, start + part)
                        ops.run_algo(x, L[0][sl], L[1][p], L[2][sl], None, b, algo)
                        start += part

                row = {"group": gname, "parts": sizes, "format": fname, "batch": batch, "algo": algo}
                row["separate_us"] = round(time_us([lambda L=L: separate(L) for L in layers]), 2)
                row["fused_us"] = round(
                    time_us([lambda L=L, x=x, b=b, a=algo: ops.run_algo(x, *L, None, b, a, sizes) for L in layers]), 2
                )
                row["speedup"] = round(row["separate_us"] / row["fused_us"], 3)
                rows.append(row)
                print("fused", json.dumps(row), flush=True)
            del layers
    return rows


def dense_reference(x: torch.Tensor, idx: torch.Tensor, codebooks: torch.Tensor, scales, bias=None) -> torch.Tensor:
    """``x @ W^T (+ bias)`` in float32 with W dequantized densely from the int64 indices (independent of
    the kernels): the reference the smem-table prototype must match before it is timed."""
    n, groups, m = idx.shape
    w = sum(codebooks.float()[mm, :, 0][idx[..., mm]] for mm in range(m)) * scales.float().reshape(n, 1, 1)
    y = x.float() @ w.reshape(n, -1).T
    return y if bias is None else y + bias.float()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30))


def smem_variants(S, g: int) -> dict:
    """The prototype's default tile and a few variants: rows per program, copies per codeword (fewer copies,
    smaller table, more resident CTAs, 2-way conflicts), resident CTAs per SM, warps."""
    base = S.smem_config(g)
    out = {"default": base}
    for bn in (8, 32):
        out[f"n{bn}"] = dataclasses.replace(base, block_n=bn)
    out["copies_half"] = dataclasses.replace(base, ncopies=S.default_ncopies(g) // 2)
    for c in (1, 2):
        out[f"ctas{c}"] = dataclasses.replace(base, ctas_per_sm=c)
    out["w8"] = dataclasses.replace(base, num_warps=8, block_n=2 * base.block_n)
    # One table shared by more warps (session 12: residency bounds the prototype, and w8 won the large
    # shapes): 16 warps over 4x the rows, at 4 and at 2 CTAs per SM, and w8 over the half-size table.
    out["w16"] = dataclasses.replace(base, num_warps=16, block_n=4 * base.block_n)
    out["w16_ctas2"] = dataclasses.replace(base, num_warps=16, block_n=4 * base.block_n, ctas_per_sm=2)
    out["w8_copies_half"] = dataclasses.replace(out["w8"], ncopies=S.default_ncopies(g) // 2)
    return out


# (activation dtype, tokens) of check_smem: 1-2 tokens run the gemv prototype, more the mm one (smem_mm.py),
# 40 tokens with a partial 64-token tile
SMEM_CHECK_CALLS = [(torch.float16, 1), (torch.float16, 2), (torch.bfloat16, 1)]
SMEM_CHECK_CALLS += [(torch.float16, 4), (torch.float16, 16), (torch.bfloat16, 16), (torch.float16, 40)]


def check_smem(S, ops, formats: list[str]) -> list[str]:
    """The opt-in dispatcher path (``LIT_CB_SMEM_TABLES=1``, ops.run_algo "gemv" for 1-2 tokens, "mm" beyond) on
    ragged shapes (rows and groups not multiples of the tile), with bias, fp16 and bf16, vs float32. Returns
    failures."""
    failures = []
    torch.manual_seed(1)
    previous = os.environ.get(S.ENV_FLAG)
    os.environ[S.ENV_FLAG] = "1"
    try:
        for fname in formats:
            m, b, g = FORMATS[fname]
            for n, k in ((1000, 1040), (37, 8 * g), (4096, 4096)):
                idx, codes, codebooks, scales = make_codebook_layers(n, k, m, b, g, 1)[0]
                bias = torch.randn(n, device="cuda", dtype=torch.float16)
                for dtype, tokens in SMEM_CHECK_CALLS:
                    x = torch.randn(tokens, k, device="cuda", dtype=dtype)
                    if not S.supports(x, codes, codebooks, b):
                        continue
                    algo = "gemv" if tokens <= 2 else "mm"
                    name = f"{fname} {n}x{k} {dtype} T={tokens} {algo}"
                    try:
                        out = ops.run_algo(x, codes, codebooks, scales, bias.to(dtype), b, algo)
                        torch.cuda.synchronize()
                    except Exception as e:  # noqa: BLE001
                        failures.append(f"{name}: {e!r}"[:400])
                        continue
                    err = rel_err(out, dense_reference(x, idx, codebooks, scales, bias.to(dtype)))
                    if not err < (3e-3 if dtype == torch.float16 else 2e-2):
                        failures.append(f"{name}: rel err {err:.2e}")
    finally:
        if previous is None:
            os.environ.pop(S.ENV_FLAG, None)
        else:
            os.environ[S.ENV_FLAG] = previous
    return failures


def smem_mm_variants(SM, tokens: int, g: int) -> dict:
    """The mm prototype's default tile and a few variants: half the copies (a 2x8 g8 table of 32 KB, a 64 KB
    reservation, three CTAs per SM instead of one; 2-way bank conflicts), the other warp count, 32-row tiles."""
    base = SM.mm_config(tokens, g)
    return {
        "default": base,
        "copies_half": dataclasses.replace(base, ncopies=128 // (2 * g) // 2),
        f"w{12 - base.num_warps}": dataclasses.replace(base, num_warps=12 - base.num_warps),
        "n32": dataclasses.replace(base, block_n=32),
        "w16": dataclasses.replace(base, num_warps=16, block_n=128),  # one table, more warps in flight
    }


def smem_entry(S, row: dict, layers: list, x: torch.Tensor, b: int, sweep: bool, time_us, kind: str = "gemv") -> None:
    """Check, then time, a smem-table prototype on this row's layers; fields added to ``row``: ``smem_*`` for the
    gemv (``kind="gemv"``, ``S`` = smem_table), ``smem_mm_*`` for the tensor-core variant (``S`` = smem_mm)."""
    from lit_cb.kernels.smem_table import resident_ctas

    idx, codes, codebooks, scales = layers[0]
    g = codebooks.shape[-1]
    if kind == "gemv":
        prefix, run, supported = "smem", S.codebook_gemv_smem, S.supports(x, codes, codebooks, b)
        configs = smem_variants(S, g) if sweep else {"default": S.smem_config(g)}
    else:
        prefix, run, supported = "smem_mm", S.codebook_mm_smem, S.supports(x, codes, codebooks, b)
        configs = smem_mm_variants(S, x.shape[0], g) if sweep else {"default": S.mm_config(x.shape[0], g)}
    if not supported:
        row[f"{prefix}_skipped"] = "format or dtype not taken by the prototype"
        return
    ref = dense_reference(x, idx, codebooks, scales)
    variants = {}
    for name, cfg in configs.items():
        res = {"config": repr(cfg)}
        try:
            out = run(x, codes, codebooks, scales, None, b, cfg)
            torch.cuda.synchronize()
            res["rel_err"] = rel_err(out, ref)
            if not res["rel_err"] < 3e-3:
                res["error"] = f"rel err {res['rel_err']:.2e} vs the dense float32 matmul: not timed"
        except Exception as e:  # noqa: BLE001
            res["error"] = f"{type(e).__name__}: {e}"[:600]
        if "error" not in res:
            fns = [lambda L=L, cfg=cfg: run(x, L[1], L[2], L[3], None, b, cfg) for L in layers]
            res["us"] = round(time_us(fns), 2)
            plan = S.shared_plan(x, codes, codebooks, scales, None, b, cfg)
            res["plan"] = dataclasses.asdict(plan)
            res["ctas_per_sm"] = resident_ctas(plan, cfg.ctas_per_sm)
        variants[name] = res
        print(f"  {prefix}", name, json.dumps(res), flush=True)
    default = variants["default"]
    row[f"{prefix}_config"] = default["config"]
    row[f"{prefix}_plan"] = default.get("plan")
    if "error" in default:
        row[f"{prefix}_error"] = default["error"]
    else:
        row[f"{prefix}_rel_err"] = default["rel_err"]
        row[f"{prefix}_us"] = default["us"]
        row[f"x_fp16_{prefix}"] = round(row["fp16_us"] / default["us"], 3)
        row[f"{prefix}_vs_ours"] = round(row["ours_us"] / default["us"], 3)
    if sweep:
        row[f"{prefix}_variants"] = variants


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--formats", default=",".join(DEFAULT_FORMATS))
    p.add_argument("--sweep", action="store_true", help="time tile variants of every kernel family")
    p.add_argument(
        "--sweep-families", default="gemv,lut,mm,dense,table", help="with --sweep: which families (name prefixes)"
    )
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--no-baselines", action="store_true", help="skip bitsandbytes NF4 and AQLM (fp16 always runs)")
    p.add_argument("--no-fused", action="store_true", help="skip the fused q/k/v and gate/up rows")
    p.add_argument("--aqlm-wait-s", type=float, default=90.0, help="how long to wait for AQLM's JIT build")
    p.add_argument("--out", default=None)
    p.add_argument("--tune", action="store_true", help="pick gemv/mm/dense per format and batch first")
    p.add_argument("--dump-asm", default=None, help="folder for PTX/SASS of the compiled kernels")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    p.add_argument(
        "--smem", action="store_true", help="add the shared-memory-table prototypes: gemv (<= 2 tokens), mm (3-64)"
    )
    p.add_argument("--smem-sweep", action="store_true", help="with --smem: also tile/copies/residency variants")
    p.add_argument(
        "--smem-check-only",
        action="store_true",
        help="only the prototype's correctness check (a few small launches: small enough for compute-sanitizer)",
    )
    args = p.parse_args()
    t_start = time.time()
    device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--smoke needs TRITON_INTERPRET=1 (the kernels run in Triton's CPU interpreter)")
        args.shapes, args.batches, args.no_baselines = "48x64,96x32", "1,16,80", True
    elif not torch.cuda.is_available():
        sys.exit("no GPU: use --smoke (with TRITON_INTERPRET=1) on a CPU")
    args.smem = args.smem or args.smem_check_only
    if args.smem and args.smoke:
        sys.exit("--smem runs inline PTX, which the interpreter cannot: run it on a GPU")
    formats = args.formats.split(",")
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        sys.exit(f"unknown --formats {unknown}; expected some of {list(FORMATS)}")

    ensure_kernels_package()
    import triton

    from lit_cb.kernels import codebook as K
    from lit_cb.kernels import dispatch, ops
    from lit_cb.kernels import smem_mm as SM
    from lit_cb.kernels import smem_table as S
    from lit_cb.layers import CodebookFormat

    versions = {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__}
    aqlm_state: dict = {}
    aqlm_thread = _start_aqlm_build(aqlm_state) if not args.no_baselines else None
    time_us = wall_time_us if args.smoke else graph_time_us
    result = {
        "device": "cpu (Triton interpreter, smoke)" if args.smoke else _device_name(),
        "versions": versions,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "timing": "wall clock of two interpreted calls (smoke: checks the code path only)"
        if args.smoke
        else "CUDA-graph median per call over weight copies rotated past the 50 MB L2",
        "dispatch": "algo from dispatch.choose_algo, tiles from ops.kernel_config (lit_cb/kernels/ops.py tile tables)",
    }
    with dispatch.interpreter_on_cpu(args.smoke):
        if args.smem_check_only:
            # A first run of an unproven kernel: a fault poisons the CUDA context, so nothing else shares
            # the process, and the launches are few enough to run under compute-sanitizer's racecheck.
            result["smem_check"] = check_smem(S, ops, formats)
            print("smem-table prototype vs float32:", result["smem_check"] or "all passed", flush=True)
            if args.out:
                pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                pathlib.Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
            sys.exit(1 if result["smem_check"] else 0)
        if not args.no_check:
            failures = check_gpu(K, ops, formats, device, args.smoke)
            result["check_failures"] = failures
            print("correctness vs float64:", "all passed" if not failures else failures, flush=True)
        if args.smem:
            result["smem_check"] = check_smem(S, ops, formats)
            print("smem-table prototype vs float32:", result["smem_check"] or "all passed", flush=True)
        nf4_ok = False
        if not args.no_baselines:
            try:
                import bitsandbytes

                versions["bitsandbytes"] = bitsandbytes.__version__
                nf4_ok = True
            except Exception as e:  # noqa: BLE001
                result["bnb_skipped"] = repr(e)[:300]

        tuned = tune(ops, dispatch, formats) if args.tune else None
        rows, sweep_rows = [], []
        for shape in args.shapes.split(","):
            n, k = map(int, shape.split("x"))
            fp16_copies = 1 if args.smoke else copies_for(n * k * 2, cap=8)
            ws = [torch.randn(n, k, device=device, dtype=torch.float16) / math.sqrt(k) for _ in range(fp16_copies)]
            nf4 = None
            if nf4_ok:
                try:
                    nf4 = bnb_setup(ws[: copies_for(n * k // 2, cap=8)])
                except Exception:  # noqa: BLE001
                    traceback.print_exc()
            for batch in map(int, args.batches.split(",")):
                x = torch.randn(batch, k, device=device, dtype=torch.float16)
                base = {"fp16_us": time_us([lambda w=w, x=x: F.linear(x, w) for w in ws])}
                if nf4 is not None:
                    try:
                        base["bnb_nf4_us"] = time_us([lambda f=f, x=x: f(x) for f in nf4])
                    except Exception as e:  # noqa: BLE001
                        print("nf4 failed:", e)
                for fname in formats:
                    m, b, g = FORMATS[fname]
                    fmt = CodebookFormat(
                        in_features=k, out_features=n, in_group_size=g, num_codebooks=m, nbits_per_codebook=b
                    )
                    code_bytes = n * (k // g) * m * (1 if b <= 8 else 2)
                    layers = make_codebook_layers(n, k, m, b, g, 1 if args.smoke else copies_for(code_bytes), device)
                    algo = dispatch.choose_algo(fmt, batch)
                    cfg = ops.kernel_config(algo, batch, n, k, g, m, ops._num_sms(x.device))
                    ours = time_us(
                        [lambda L=L, x=x, b=b, a=algo: ops.run_algo(x, L[1], L[2], L[3], None, b, a) for L in layers]
                    )
                    row = {"shape": shape, "batch": batch, "format": fname, "algo": algo}
                    row.update({"shape_class": ops.shape_class(n, k), "config": repr(cfg), "ours_us": round(ours, 2)})
                    row.update({kk: round(v, 2) for kk, v in base.items()})
                    row["x_fp16"] = round(base["fp16_us"] / ours, 3)
                    if batch == 1:  # the code-read floor: every code read once by a plain HBM-bound reduction
                        row["code_read_floor_us"] = round(time_us([lambda L=L: read_all(L[1]) for L in layers]), 2)
                    moved = code_bytes + m * 2**b * g * 2 + batch * (k + n) * 2
                    row["ours_GBps"] = round(moved / ours / 1e3, 1)
                    row["ours_TFLOPs"] = round(2 * batch * n * k / ours / 1e6, 1)
                    if args.smem and batch <= 2:
                        smem_entry(S, row, layers, x, b, args.smem_sweep, time_us)
                    elif args.smem and batch <= 64:
                        smem_entry(SM, row, layers, x, b, args.smem_sweep, time_us, kind="mm")
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if args.sweep:
                        families = tuple(args.sweep_families.split(","))
                        variants = [v for v in sweep_variants(K, batch, g, m, b) if v[0].startswith(families)]
                        ref = dense_reference(x, layers[0][0], layers[0][2], layers[0][3])
                        for name, fn in variants:
                            try:
                                err = rel_err(fn(x, layers[0][1], layers[0][2], layers[0][3], b), ref)
                                for L in layers:  # per-layer setup (the table kernel's code layout) before timing
                                    fn(x, L[1], L[2], L[3], b)
                                t = time_us([lambda L=L, fn=fn, x=x, b=b: fn(x, L[1], L[2], L[3], b) for L in layers])
                            except Exception as e:  # noqa: BLE001
                                print(name, "failed", repr(e)[:200])
                                continue
                            sr = {"shape": shape, "batch": batch, "format": fname, "variant": name, "rel_err": err}
                            sr.update({"us": round(t, 2), "GBps": round(moved / t / 1e3, 1)})
                            sweep_rows.append(sr)
                            print("  sweep", json.dumps(sr), flush=True)
                    del layers
                    _INTERLEAVED.clear()
                if device == "cuda":
                    torch.cuda.empty_cache()
            del ws, nf4
        result["rows"] = rows
        if not args.no_fused:
            batches = sorted({min(v, 2048) for v in map(int, args.batches.split(","))})
            result["fused"] = _fused_rows(ops, dispatch, CodebookFormat, formats, batches, device, time_us, args.smoke)
    if aqlm_thread is not None:
        _aqlm_rows(aqlm_thread, aqlm_state, rows, args.aqlm_wait_s, result)
    result["summary"] = summarize(rows)
    result["total_seconds"] = round(time.time() - t_start, 1)
    if args.dump_asm:
        dump_asm(K, args.dump_asm)
    if sweep_rows:
        result["sweep"] = sweep_rows
    if tuned:
        result["tune"] = tuned
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
    print(markdown_table(rows))


def _device_name() -> str:
    props = torch.cuda.get_device_properties(0)
    return f"{props.name}, {props.multi_processor_count} SMs"


def _aqlm_rows(thread: threading.Thread, state: dict, rows: list[dict], wait_s: float, result: dict) -> None:
    """AQLM's CUDA kernel (aqlm::code2x8_matmat / code1x16_matmat) on every 2x8 / 1x16 row up to 64 tokens,
    on the same kind of weights, once its JIT build is done."""
    thread.join(timeout=wait_s)
    if state.get("ops") is None:
        result["aqlm_skipped"] = state.get("error") or f"the JIT build did not finish in {wait_s:.0f} s"
        return
    result["versions"]["aqlm"] = state.get("version")
    result["aqlm_build_s"] = state.get("build_s")
    for row in rows:
        if row["format"] not in ("2x8_g8", "1x16_g8") or row["batch"] > 64:
            continue
        n, k = map(int, row["shape"].split("x"))
        m, b, g = FORMATS[row["format"]]
        layers = make_codebook_layers(n, k, m, b, g, copies_for(n * (k // g) * m * (1 if b <= 8 else 2)))
        op = state["ops"].code2x8_matmat if b == 8 else state["ops"].code1x16_matmat
        zb = torch.zeros(n, device="cuda", dtype=torch.float16)
        x = torch.randn(row["batch"], k, device="cuda", dtype=torch.float16)
        aq = [(L[1].view(torch.int8) if b == 8 else L[1], L[2].contiguous(), L[3]) for L in layers]
        try:
            row["aqlm_us"] = round(graph_time_us([lambda a=a: op(x, a[0], a[1], a[2], zb) for a in aq]), 2)
            row["x_aqlm"] = round(row["aqlm_us"] / row["ours_us"], 3)
        except Exception as e:  # noqa: BLE001
            row["aqlm_error"] = repr(e)[:300]
        print("aqlm", json.dumps(row), flush=True)
        del layers
        torch.cuda.empty_cache()


def summarize(rows: list[dict]) -> dict:
    """``"<shape> b<batch> <format>"`` -> ours, fp16 and AQLM microseconds and the speed-ups."""
    keep = ("algo", "ours_us", "fp16_us", "x_fp16", "aqlm_us", "x_aqlm", "code_read_floor_us")
    keep += ("smem_us", "x_fp16_smem", "smem_vs_ours", "smem_error")
    keep += ("smem_mm_us", "x_fp16_smem_mm", "smem_mm_vs_ours", "smem_mm_error")
    return {f"{r['shape']} b{r['batch']} {r['format']}": {kk: r[kk] for kk in keep if kk in r} for r in rows}


_INTERLEAVED: dict[tuple, torch.Tensor] = {}  # per-layer setup (code layouts, prebuilt tables), cleared with the layers


def interleaved(codes: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """The table kernel's code layout of a bench layer's codes, made once per layer (as a layer would at load) so
    that the timed calls (and a CUDA graph's capture) only launch kernels."""
    from lit_cb.kernels import table_gemv as T

    key = (codes.data_ptr(), tuple(codes.shape), chunk)
    if key not in _INTERLEAVED:
        _INTERLEAVED[key] = T.interleave_codes(codes, chunk)
    return _INTERLEAVED[key]


def table_variants(batch: int, b: int) -> list:
    """The lookup-table matvec (lit_cb/kernels/table_gemv.py; issue 10's L1-sector bound): rows per program,
    chunks a loop step, programs per SM, warps, code columns per lane and fp32 tables. The table build is inside
    every timed call, as a layer that does not share it pays it."""
    from lit_cb.kernels import table_gemv as T

    if batch > 4 or b > T.MAX_NBITS:
        return []
    out = []
    # rows per program set the table's L2 -> SM traffic (every row tile reads every window: C * 2**B * 2 bytes,
    # 1.4 MB at 4096 x 11008 1x8 g4, times N / block_n tiles); more rows than lanes repeat the lanes' rows;
    # tokens per program (bt) share one load of the codes
    for bn, bt, per_sm, warps, chunk, f32 in [
        (128, 4, 4, 4, 16, False),
        (256, 4, 4, 4, 16, False),
        (256, 4, 4, 8, 16, False),
        (512, 4, 4, 8, 16, False),
        (512, 4, 2, 16, 16, False),
        (256, 1, 4, 8, 16, False),
        (256, 4, 8, 8, 16, False),
        (256, 4, 4, 8, 8, False),
        (256, 4, 4, 8, 16, True),
        # session 23: 8-column code vectors won every cell (fewer registers a lane, more warps in flight); around it
        (256, 4, 8, 8, 8, False),
        (128, 4, 4, 4, 8, False),
        (256, 4, 4, 8, 4, False),
    ]:
        cfg = T.TableGemvConfig(block_n=bn, block_t=bt, programs_per_sm=per_sm, num_warps=warps, table_fp32=f32)
        out.append(
            (
                f"table_n{bn}_t{bt}_p{per_sm}_w{warps}_c{chunk}{'_f32' if f32 else ''}",
                lambda x, c, cb, s, b, cfg=cfg, chunk=chunk: T.table_gemv(
                    x, interleaved(c, chunk), cb, s, None, b, cfg
                ),
            )
        )
    # the first variant with its tables built outside the timed call: the difference to it is the build's share
    first = T.TableGemvConfig(block_n=128, block_t=4, programs_per_sm=4, num_warps=4)
    out.append(
        (
            "table_n128_t4_p4_w4_c16_prebuilt",
            lambda x, c, cb, s, b: T.table_gemv(x, interleaved(c), cb, s, None, b, first, table=prebuilt(x, cb)),
        )
    )
    return out


def prebuilt(x: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """The table kernel's tables of ``x`` for one layer's codebooks, built once (cleared with the layers)."""
    from lit_cb.kernels import table_gemv as T

    key = ("table", x.data_ptr(), tuple(x.shape), codebooks.data_ptr())
    if key not in _INTERLEAVED:
        _INTERLEAVED[key] = T.build_tables(x, codebooks)
    return _INTERLEAVED[key]


def sweep_variants(K, batch: int, g: int, m: int, b: int):
    """Tile variants per kernel family for this batch size (for tuning dispatch thresholds)."""
    out = table_variants(batch, b)
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
