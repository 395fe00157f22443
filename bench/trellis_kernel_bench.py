"""Issue 10, computed codes: the trellis decode kernel (lit_cb/kernels/trellis.py) against fp16 cuBLAS and the
1x8_g4 codebook kernel, per layer shape and token count, on one GPU.

What each row times (CUDA-graph median per call over weight copies rotated past the 50 MB L2, as
bench/kernel_bench.py does):
    fp16            F.linear with an fp16 weight (cuBLAS)
    trellis         TrellisLinear's decode path: the input rotation (lit_cb/kernels/rotation.py on a GPU) + the kernel
    rotation_torch / rotation_kernel   the input rotation alone, in PyTorch ops / through the Triton kernels
    trellis_kernel  the kernel alone on an already-rotated input (tensor cores from 2 tokens, fp16)
    trellis_kernel_fma  the FMA kernel (the one-token path) at 2 tokens or more, for comparison
    trellis_kernel_no_ptx  the same with plain integer ops for the funnel shift and the byte sum (no inline PTX)
    codebook_1x8_g4 CodebookLinear 1x8 g4 through lit_cb's dispatcher (the shipped 2-bit codebook format)
Correctness first: every shape's kernel output is checked against the dense float64 product of the same weights.
Also a split-K sweep at one token (the default split is chosen from the row tiles alone).

    source bench/device_setup.sh; python bench/trellis_kernel_bench.py --out $OUT/trellis_kernel_h100.json
    TRITON_INTERPRET=1 python bench/trellis_kernel_bench.py --smoke     # CPU, tiny shapes, no timings worth reading
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys
import time

import torch
import torch.nn.functional as F

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _load(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _forget_rotation(layer) -> None:
    """Drop the rotation the layer's width shares (TrellisLinear.rotated_input keeps the last one), so that a
    timed call rotates its input as a layer with its own input would."""
    layer.rotation().last_rotated = None


def random_trellis(out_f: int, in_f: int, device: str, seed: int):
    from lit_cb.trellis import TrellisFormat, TrellisLinear

    fmt = TrellisFormat(in_f, out_f)
    gen = torch.Generator().manual_seed(seed)
    symbols = torch.randint(0, 2**fmt.bits_per_step, (fmt.num_tiles, fmt.symbols_per_tile), generator=gen)
    layer = TrellisLinear(fmt, dtype=torch.float16)
    layer.codes.copy_(symbols.to(torch.uint8))  # any symbol stream is a walk
    layer.scales.data.copy_((torch.rand(out_f, 1, generator=gen) + 0.5) * 0.02)
    return layer.to(device)


def random_codebook(out_f: int, in_f: int, device: str, seed: int):
    from lit_cb.layers import CodebookFormat, CodebookLinear

    fmt = CodebookFormat(in_f, out_f, in_group_size=4, num_codebooks=1, nbits_per_codebook=8)
    gen = torch.Generator().manual_seed(seed)
    layer = CodebookLinear(fmt, dtype=torch.float16)
    layer.codes.copy_(torch.randint(0, 256, layer.codes.shape, generator=gen).to(torch.uint8))
    layer.codebooks.data.copy_(torch.randn(layer.codebooks.shape, generator=gen) * 0.02)
    return layer.to(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    p.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008,28672x8192", help="OUTxIN")
    p.add_argument("--tokens", default="1,4,16")
    p.add_argument("--splits", default="1,2,4,8,16,32", help="split-K values swept at one token")
    p.add_argument("--prefill", type=int, default=2048, help="tokens of the prefill row")
    args = p.parse_args()
    kb = _load("bench_kernels", "kernel_bench.py")  # graph timing, the checks before any work, the JSON
    device = kb.bench_device(p, args)
    if args.smoke:
        args.shapes, args.tokens, args.splits, args.prefill = "64x48", "1,3", "1,2", 20

    from lit_cb.kernels import dispatch
    from lit_cb.kernels import rotation as KR
    from lit_cb.kernels import trellis as KT

    bk = None if args.smoke else kb

    def time_us(fns) -> float:
        if bk is not None:
            return bk.graph_time_us(fns)
        fns[0]()
        t0 = time.perf_counter()
        fns[-1]()
        return (time.perf_counter() - t0) * 1e6

    what = "trellis decode kernel (computed codes, L12 k2, 32x8 tiles) vs fp16 and the 1x8_g4 codebook kernel"
    doc: dict = {
        **kb.result_header(what, args.smoke),
        "check": [],
        "layers": [],
        "split_k": [],
        "program_sweep": [],
        "prefill": [],
    }

    def flush() -> None:
        kb.write_json(args.out, doc)

    tokens_list = [int(t) for t in args.tokens.split(",")]
    with dispatch.interpreter_on_cpu(args.smoke), torch.no_grad():
        for shape in args.shapes.split(","):
            out_f, in_f = (int(v) for v in shape.split("x"))
            bytes_fp16 = out_f * in_f * 2
            copies = 2 if args.smoke else bk.copies_for(bytes_fp16 // 7)  # trellis weights: ~2.1 bits
            tl = [random_trellis(out_f, in_f, device, s) for s in range(copies)]
            words = [layer.tile_words() for layer in tl]
            fp16_copies = 2 if args.smoke else bk.copies_for(bytes_fp16)
            dense = [torch.randn(out_f, in_f, device=device, dtype=torch.float16) * 0.02 for _ in range(fp16_copies)]
            cbs = [random_codebook(out_f, in_f, device, s) for s in range(copies)]
            # correctness: the kernel against the float64 product of the same weights
            x = torch.randn(max(tokens_list), in_f, device=device, dtype=torch.float16)
            xr = tl[0].rotation().rotate(x.float()).half()
            got = KT.trellis_gemv(xr, words[0], tl[0].scales, tl[0].fmt).double()
            ref = xr.double() @ tl[0].dequantize_rotated().double().T
            rel = float((got - ref).norm() / ref.norm())
            layer_out = tl[0](x).double()
            ref_layer = x.double() @ tl[0].dequantize().double().T
            rel_layer = float((layer_out - ref_layer).norm() / ref_layer.norm())
            rot = tl[0].rotation()
            rot_kernel = KR.supports(rot, x)  # widths of more than rotation.MAX_GROUPS groups rotate in PyTorch
            rot_rel = (
                float((KR.rotate(x, rot).double() - rot.rotate(x.double())).norm() / x.double().norm())
                if rot_kernel
                else 0.0
            )
            xh = x[:2].contiguous()  # two tokens: the tensor-core kernel against float64
            got_mma = KT.trellis_gemv(rot.rotate(xh.float()).half(), words[0], tl[0].scales, tl[0].fmt, mma=True)
            ref_mma = rot.rotate(xh.float()).half().double() @ tl[0].dequantize_rotated().double().T
            rel_mma = float((got_mma.double() - ref_mma).norm() / ref_mma.norm())
            doc["check"].append(
                {
                    "shape": shape,
                    "kernel_rel_err": rel,
                    "layer_rel_err": rel_layer,
                    "rotation_kernel_rel_err": rot_rel,
                    "mma_kernel_rel_err": rel_mma,
                }
            )
            print("check", doc["check"][-1], flush=True)
            if rel > 1e-3 or rel_layer > 1e-2 or rot_rel > 1e-3 or rel_mma > 1e-3:
                flush()
                sys.exit(f"{shape}: the kernel disagrees with the float64 reference (rel {rel:.2e}, {rel_layer:.2e})")
            for m in tokens_list:
                xs = torch.randn(m, in_f, device=device, dtype=torch.float16)
                xrs = tl[0].rotation().rotate(xs.float()).half()
                row = {"shape": shape, "tokens": m}
                row["fp16_us"] = time_us([lambda w=w, xs=xs: F.linear(xs, w) for w in dense])
                row["rotation_torch_us"] = time_us([lambda xs=xs, rot=rot: rot.rotate(xs.float()).to(xs.dtype)])
                if rot_kernel:
                    row["rotation_kernel_us"] = time_us([lambda xs=xs, rot=rot: KR.rotate(xs, rot)])
                row["trellis_us"] = time_us(  # the rotation's reuse cache cleared: each call rotates its input
                    [lambda layer=layer, xs=xs: (_forget_rotation(layer), layer(xs))[1] for layer in tl]
                )
                row["trellis_kernel_us"] = time_us(
                    [
                        lambda w=w, layer=layer, xrs=xrs: KT.trellis_gemv(xrs, w, layer.scales, layer.fmt)
                        for w, layer in zip(words, tl, strict=True)
                    ]
                )
                if m > 1:  # the FMA kernel that one token takes, at this token count (the default is the MMA one)
                    row["trellis_kernel_fma_us"] = time_us(
                        [
                            lambda w=w, layer=layer, xrs=xrs: KT.trellis_gemv(
                                xrs, w, layer.scales, layer.fmt, mma=False
                            )
                            for w, layer in zip(words, tl, strict=True)
                        ]
                    )
                if device == "cuda":  # the same kernel with plain integer ops instead of shf.l.wrap / dp4a
                    row["trellis_kernel_no_ptx_us"] = time_us(
                        [
                            lambda w=w, layer=layer, xrs=xrs: KT.trellis_gemv(
                                xrs, w, layer.scales, layer.fmt, ptx=False
                            )
                            for w, layer in zip(words, tl, strict=True)
                        ]
                    )
                row["codebook_1x8_g4_us"] = time_us([lambda layer=layer, xs=xs: layer(xs) for layer in cbs])
                for key in ("trellis", "trellis_kernel", "codebook_1x8_g4"):
                    row[f"{key}_vs_fp16"] = row["fp16_us"] / row[f"{key}_us"]
                doc["layers"].append(row)
                print("layer", json.dumps(row), flush=True)
                flush()
            # prefill: the layer decodes its weight on the device per call, then one GEMM (issue 10: >= 0.9x fp16)
            xp = torch.randn(args.prefill, in_f, device=device, dtype=torch.float16)
            row = {"shape": shape, "tokens": args.prefill}
            row["fp16_us"] = time_us([lambda w=w, xp=xp: F.linear(xp, w) for w in dense])
            row["trellis_us"] = time_us(
                [lambda layer=layer, xp=xp: (_forget_rotation(layer), layer(xp))[1] for layer in tl]
            )
            row["dequantize_us"] = time_us(
                [
                    lambda w=w, layer=layer: KT.trellis_dequantize(w, layer.scales, layer.fmt, torch.float16)
                    for w, layer in zip(words, tl, strict=True)
                ]
            )
            row["trellis_vs_fp16"] = row["fp16_us"] / row["trellis_us"]
            doc["prefill"].append(row)
            print("prefill", json.dumps(row), flush=True)
            # program shape: row tiles per program x warps at the default split-K, 1 and 16 tokens
            for m_sweep, shapes_swept in (
                (1, ((4, 2), (4, 4), (8, 2), (8, 8), (16, 4), (16, 8))),
                (16, ((4, 4), (16, 8))),
            ):
                xm = tl[0].rotation().rotate(torch.randn(m_sweep, in_f, device=device).float()).half()
                for tpp, nw in shapes_swept:
                    us = time_us(
                        [
                            lambda w=w, layer=layer, xm=xm, tpp=tpp, nw=nw: KT.trellis_gemv(
                                xm, w, layer.scales, layer.fmt, num_warps=nw, tiles_per_program=tpp
                            )
                            for w, layer in zip(words, tl, strict=True)
                        ]
                    )
                    doc["program_sweep"].append(
                        {"shape": shape, "tokens": m_sweep, "tiles_per_program": tpp, "num_warps": nw, "kernel_us": us}
                    )
            flush()
            x1 = tl[0].rotation().rotate(torch.randn(1, in_f, device=device).float()).half()
            for split in (int(s) for s in args.splits.split(",")):
                us = time_us(
                    [
                        lambda w=w, layer=layer, x1=x1, split=split: KT.trellis_gemv(
                            x1, w, layer.scales, layer.fmt, split_k=split
                        )
                        for w, layer in zip(words, tl, strict=True)
                    ]
                )
                doc["split_k"].append({"shape": shape, "split_k": split, "kernel_us": us})
            flush()
            del tl, words, dense, cbs
    flush()
    print(json.dumps({"layers": doc["layers"]}, indent=1))


if __name__ == "__main__":
    main()
