"""The trellis quantizer's Viterbi search on one GPU: the PyTorch lit_cb.trellis.viterbi (about ten small ops per
step, launch-bound) against the one-launch Triton kernel lit_cb.kernels.viterbi.viterbi_walks.

What it times (median of --repeats calls, torch.cuda.synchronize() around each, after one untimed warm-up call):
    searches   one call at L=12, k=2, T=256 (a 32 x 8 tile per row, random column weights d) for N rows, N in
               --ns: the N = rows/32 tiles of one block-LDLQ step of a layer (576 -> 18, 4096 -> 128, 11008 -> 344,
               28672 -> 896); the kernel also at each of --warps warps per program
    layer      one whole lit_cb.quant.trellis.quantize_trellis (rotation, row scales, block LDLQ) of a random
               --layer x --layer weight with a random SPD Hessian and TrellisConfig(), both ways: the kernel by
               patching lit_cb.quant.trellis.viterbi
Correctness first: every search's per-row objective sum_t d_t (x_t - v(s_t))**2 must agree with the reference to
rtol 1e-5 (the walks themselves may differ only at exact ties), else the bench stops.

    python bench/viterbi_bench.py --out $OUT/viterbi_h100.json
    TRITON_INTERPRET=1 python bench/viterbi_bench.py --smoke     # CPU, tiny sizes, no timings worth reading
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from unittest import mock

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Median wall time of ``fn`` in ms over ``repeats`` calls, after one untimed call (compiles, allocator)."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def objective(x: torch.Tensor, values: torch.Tensor, walks: torch.Tensor, d: torch.Tensor | None) -> torch.Tensor:
    """Per row ``sum_t d_t (x_t - values[s_t])**2`` in float64."""
    err = (x.double() - values.double()[walks]) ** 2
    return (err if d is None else err * d.double()).sum(dim=1)


def random_spd(n: int, device: str, seed: int) -> torch.Tensor:
    """A Hessian-like SPD matrix: ``A^T A / m`` of correlated inputs (a random mix), plus a small ridge."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(4 * n, n, generator=gen) @ (torch.eye(n) + 0.3 * torch.randn(n, n, generator=gen) / n**0.5)
    h = a.T @ a / (4 * n)
    return (h + 1e-3 * h.diagonal().mean() * torch.eye(n)).to(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="JSON path (never overwritten)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU under TRITON_INTERPRET=1")
    p.add_argument("--ns", default="6,18,48,128,344,896", help="rows (tiles) per search call")
    p.add_argument("--state-bits", type=int, default=12)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--steps", type=int, default=256, help="T: weights per tile")
    p.add_argument("--warps", default="4,8,16", help="kernel warps per program, each timed besides the default")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--layer", type=int, default=576, help="the timed layer is LAYER x LAYER; 0 skips it")
    args = p.parse_args()
    if args.out and pathlib.Path(args.out).exists():
        p.error(f"--out {args.out} exists; choose another path (nothing is overwritten)")
    device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--smoke needs TRITON_INTERPRET=1 (the kernel runs in Triton's CPU interpreter)")
        args.ns, args.state_bits, args.steps, args.warps, args.repeats, args.layer = "2,3", 6, 16, "1", 1, 16
    elif not torch.cuda.is_available():
        sys.exit("no GPU: use --smoke (with TRITON_INTERPRET=1) on a CPU")
    import triton

    import lit_cb.quant.trellis as QT
    from lit_cb.configs.trellis import TrellisConfig
    from lit_cb.kernels import dispatch
    from lit_cb.kernels import viterbi as KV
    from lit_cb.trellis import computed_values, viterbi

    state_bits, k, t_len = args.state_bits, args.k, args.steps
    warps = [int(w) for w in args.warps.split(",")]
    default_warps = KV._num_warps(2**state_bits)
    doc: dict = {
        "what": f"Viterbi search, PyTorch lit_cb.trellis.viterbi vs the Triton kernel, L={state_bits} k={k} T={t_len}",
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter, smoke)",
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__},
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "timing": f"median of {args.repeats} calls after a warm-up, torch.cuda.synchronize() around each",
        "kernel_default_warps": default_warps,
        "searches": [],
        "layer": None,
    }

    def flush() -> None:
        if args.out:
            pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            pathlib.Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")

    values = computed_values(state_bits, device)
    with dispatch.interpreter_on_cpu(args.smoke), torch.no_grad():
        for n in (int(v) for v in args.ns.split(",")):
            gen = torch.Generator().manual_seed(n)
            x = (torch.randn(n, t_len, generator=gen) * 1.1).to(device)
            d = (torch.rand(t_len, generator=gen) + 0.5).to(device)
            ref = viterbi(x, values, k, weights=d)
            got = KV.viterbi_walks(x, values, k, weights=d)
            obj_ref, obj_got = objective(x, values, ref, d), objective(x, values, got, d)
            rel = float(((obj_got - obj_ref).abs() / obj_ref.abs().clamp_min(1e-30)).max())
            row: dict = {
                "n": n,
                "objective_max_rel_diff": rel,
                "walks_equal_rows": int((got == ref).all(dim=1).sum()),
            }
            if rel > 1e-5 or not torch.equal(got[:, 1:] >> k, got[:, :-1] & (2 ** (state_bits - k) - 1)):
                doc["searches"].append(row)
                flush()
                sys.exit(f"N={n}: the kernel's walks are not as good as the reference's (max rel diff {rel:.2e})")
            row["torch_ms"] = time_ms(lambda x=x, d=d: viterbi(x, values, k, weights=d), device, args.repeats)
            row["kernel_ms_by_warps"] = {
                str(w): time_ms(
                    lambda x=x, d=d, w=w: KV.viterbi_walks(x, values, k, weights=d, num_warps=w), device, args.repeats
                )
                for w in warps
            }
            row["kernel_ms"] = row["kernel_ms_by_warps"].get(str(default_warps)) or time_ms(
                lambda x=x, d=d: KV.viterbi_walks(x, values, k, weights=d), device, args.repeats
            )
            row["speedup"] = row["torch_ms"] / row["kernel_ms"]
            doc["searches"].append(row)
            print("search", json.dumps(row), flush=True)
            flush()

        if args.layer:
            size = args.layer
            config = (
                TrellisConfig(state_bits=state_bits, bits_per_step=k, tile_rows=4, tile_cols=8)
                if args.smoke
                else TrellisConfig()
            )
            gen = torch.Generator().manual_seed(0)
            weight = (torch.randn(size, size, generator=gen) * 0.02).to(device)
            hessian = random_spd(size, device, seed=1)

            def kernel_viterbi(x, values, k, prev=None, weights=None):
                return KV.viterbi_walks(x, values, k, prev, weights)

            def run_layer(patched: bool):
                if not patched:
                    return QT.quantize_trellis(weight, hessian, config)
                with mock.patch.object(QT, "viterbi", kernel_viterbi):
                    return QT.quantize_trellis(weight, hessian, config)

            def timed(patched: bool):
                run_layer(patched)  # warm-up: kernel compile, cuSOLVER/cuBLAS handles
                _sync(device)
                t0 = time.perf_counter()
                layer = run_layer(patched)
                _sync(device)
                return time.perf_counter() - t0, layer

            torch_s, ref_layer = timed(False)
            kernel_s, got_layer = timed(True)
            h = hessian.double()

            def h_err(layer) -> float:
                e = weight.double() - layer.dequantize().double()
                return float(torch.trace(e @ h @ e.T) / torch.trace(weight.double() @ h @ weight.double().T))

            doc["layer"] = {
                "shape": [size, size],
                "config": {f: getattr(config, f) for f in ("state_bits", "bits_per_step", "tile_rows", "tile_cols")},
                "torch_s": torch_s,
                "kernel_s": kernel_s,
                "speedup": torch_s / kernel_s,
                "codes_equal_frac": float((got_layer.codes == ref_layer.codes).float().mean()),
                "hessian_rel_err_torch": h_err(ref_layer),
                "hessian_rel_err_kernel": h_err(got_layer),
            }
            print("layer", json.dumps(doc["layer"]), flush=True)
            flush()
    flush()
    print(json.dumps({"searches": doc["searches"], "layer": doc["layer"]}, indent=1))


if __name__ == "__main__":
    main()
