"""AQLM's beam search (lit_cb/quant/aqlm.py) timed with and without its batched ``R H`` updates, per layer shape.

    python bench/beam_search_bench.py --out bench/results/beam_search_cpu.json                   # CPU, ~1 minute
    python bench/beam_search_bench.py --device cuda --shapes 4096x4096,11008x4096,4096x11008 \\
        --out $OUT/beam_search_h100.json                                                        # LLaMA-7B shapes

``lazy_block = 1`` materialises every hypothesis' ``R H`` after every input group (the traffic of the search
before the batching: ``rows x beam x in`` floats a group); the default (``LAZY_BLOCK``) once per block. One
search pass over codebook 0 of a 2x8 g8 layer (beam 8) with random codes, correlated inputs and float32; each
row of the result has both times, both objectives and the tensor ops per step (CPU profiler, when asked).
``--graphs`` (CUDA) adds the batched search replayed from CUDA graphs (``LIT_CB_GRAPH_BEAM``,
lit_cb/quant/beam_graphs.py), and whether it found the same codes.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.kernel_bench import write_json  # noqa: E402


def problem(out: int, inp: int, device: str, g: int = 8, num_codewords: int = 256, seed: int = 0):
    """A layer, its Hessian from correlated inputs, 2x8 codebooks, scales and random starting codes."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * inp, inp, generator=gen) @ (torch.randn(inp, inp, generator=gen) / inp**0.5 + torch.eye(inp))
    hessian = x.T @ x / x.shape[0]
    weight = torch.randn(out, inp, generator=gen)
    codebooks = torch.randn(2, num_codewords, 1, g, generator=gen) * 0.5
    scales = torch.rand(out, generator=gen) + 0.5
    codes = torch.randint(num_codewords, (out, inp // g, 2), generator=gen)
    return [t.to(device) for t in (weight, hessian, codes, codebooks, scales)]


def timed_search(prob: list, lazy_block: int, device: str) -> tuple[float, torch.Tensor]:
    """Seconds of one search pass over codebook 0 (beam 8), and the codes it found."""
    from lit_cb.quant.aqlm import beam_search_codes

    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    codes = beam_search_codes(*prob, 0, 8, lazy_block=lazy_block)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, codes


def header(device: str) -> dict:
    import datetime
    import platform
    import shlex

    return {
        "what": "AQLM beam search (one pass, codebook 0 of 2x8 g8, beam 8): batched R H updates against per-group",
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or 'x86_64'})",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "timing": "wall seconds of one pass (CUDA: after one warm-up pass, synchronised)",
    }


def ops_per_step(args: list, lazy_block: int, num_in: int) -> float:
    """Top-level tensor ops (views excluded) per input group of one search, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    from lit_cb.quant.aqlm import beam_search_codes

    views = {"aten::view", "aten::reshape", "aten::slice", "aten::select", "aten::unsqueeze", "aten::expand",
             "aten::t", "aten::transpose", "aten::as_strided", "aten::_unsafe_view", "aten::alias", "aten::detach",
             "aten::empty", "aten::permute", "aten::narrow", "aten::diagonal", "aten::squeeze"}  # fmt: skip
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        beam_search_codes(*args, 0, 8, lazy_block=lazy_block)
    top = [e for e in prof.events() if e.name.startswith("aten::") and e.name not in views]
    top = [e for e in top if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    return len(top) / num_in


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="576x576,576x1536,1536x576,256x4096,128x11008", help="OUTxIN,...")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--ops", action="store_true", help="also count tensor ops per step (profiler, a 64 x 512 layer)")
    p.add_argument("--graphs", action="store_true", help="CUDA: also the batched search from CUDA graphs")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.out and pathlib.Path(args.out).exists():
        p.error(f"--out {args.out} exists; choose another path (nothing is overwritten)")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no GPU here")
    if args.graphs and args.device != "cuda":
        p.error("--graphs needs --device cuda (CUDA graphs)")
    from lit_cb.quant.aqlm import LAZY_BLOCK, layer_objective, reconstruct

    doc = header(args.device)
    doc.update(device_kind=args.device, threads=torch.get_num_threads(), lazy_block=LAZY_BLOCK, rows=[])
    for shape in args.shapes.split(","):
        out, inp = map(int, shape.split("x"))
        prob = problem(out, inp, args.device)
        weight, hessian, _, codebooks, scales = prob
        row = {"shape": shape}
        for name, block in (("per_group", 1), ("batched", LAZY_BLOCK)):
            if args.device == "cuda":  # one warm-up pass (allocator, cuBLAS handles)
                timed_search(prob, block, args.device)
            row[f"{name}_s"], codes = timed_search(prob, block, args.device)
            row[f"{name}_objective"] = float(layer_objective(weight, reconstruct(codes, codebooks, scales), hessian))
        if args.graphs:  # LIT_CB_GRAPH_BEAM: the first call captures, the second is timed
            from lit_cb.quant import beam_graphs

            os.environ[beam_graphs.ENV_FLAG] = "1"
            try:
                timed_search(prob, LAZY_BLOCK, args.device)
                row["graphed_s"], graphed = timed_search(prob, LAZY_BLOCK, args.device)
                row["graphed_same_codes"] = bool(torch.equal(graphed, codes))
                row["graphed_speedup"] = row["batched_s"] / row["graphed_s"]
            except Exception as err:  # noqa: BLE001  (a failed capture is a result)
                row["graphed_error"] = f"{type(err).__name__}: {err}"[:1000]
            finally:
                del os.environ[beam_graphs.ENV_FLAG]
        row["speedup"] = row["per_group_s"] / row["batched_s"]
        doc["rows"].append(row)
        print(row, flush=True)
        write_json(args.out, doc)
    if args.ops:
        small = problem(64, 512, "cpu")
        doc["ops_per_step_64x512"] = {
            "per_group": ops_per_step(small, 1, 64),
            "batched": ops_per_step(small, LAZY_BLOCK, 64),
        }
        print(doc["ops_per_step_64x512"], flush=True)
    write_json(args.out, doc)


if __name__ == "__main__":
    main()
