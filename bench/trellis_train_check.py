"""The trellis's training path on a GPU (``_DeviceDecodedLinear``: the weight decoded on the device in the forward
and again in the backward) against the reference path (one float32 decode, kept), on SmolLM2-135M's layer shapes.

    python bench/trellis_train_check.py --out $OUT/trellis_train_check.json

Checks the output and the gradients of the input and the row scales in float32 and under bf16 autocast (the
recovery's precision), and times one forward + backward of each path (CUDA events, median of 20). CI runs the same
comparison under the Triton interpreter (tests/test_trellis_kernel.py); this is the check on the real kernels.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import shlex
import sys

import torch


def _layer(out_f: int, in_f: int, seed: int):
    from lit_cb.trellis import TrellisFormat, TrellisLinear

    fmt = TrellisFormat(in_f, out_f)
    gen = torch.Generator().manual_seed(seed)
    layer = TrellisLinear(fmt, dtype=torch.float32)
    layer.codes.copy_(torch.randint(0, 2**fmt.bits_per_step, layer.codes.shape, generator=gen).to(torch.uint8))
    layer.scales.data.copy_((torch.rand(out_f, 1, generator=gen) + 0.5) * 0.02)
    return layer.cuda()


def _step(layer, x: torch.Tensor, kernels: bool, autocast: bool):
    layer.use_kernels = kernels
    layer.scales.grad = None
    x = x.clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = layer(x)
    weights = torch.linspace(-1, 1, out.numel(), device=x.device).reshape(out.shape)
    (out.float() * weights).sum().backward()
    return out.detach().float(), x.grad.float(), layer.scales.grad.float()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--shapes", default="576x576,1536x576,576x1536", help="OUTxIN (SmolLM2-135M's)")
    p.add_argument("--tokens", type=int, default=8 * 2048, help="tokens per call (block fine-tuning's batch)")
    args = p.parse_args()
    if args.out and pathlib.Path(args.out).exists():
        p.error(f"--out {args.out} exists; choose another path (nothing is overwritten)")
    if not torch.cuda.is_available():
        sys.exit("no GPU: the interpreter version of this check is tests/test_trellis_kernel.py")
    import triton

    doc: dict = {
        "what": "trellis training path (device decode in forward and backward) vs the float32 reference path",
        "device": torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__},
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "rows": [],
    }
    ok = True
    for shape in args.shapes.split(","):
        out_f, in_f = (int(v) for v in shape.split("x"))
        layer = _layer(out_f, in_f, seed=out_f + in_f)
        layer.scales.requires_grad_(True)
        x = torch.randn(args.tokens, in_f, device="cuda")
        for autocast in (False, True):
            ref = _step(layer, x, kernels=False, autocast=autocast)
            got = _step(layer, x, kernels=True, autocast=autocast)
            # relative to each tensor's scale: bf16 rounds the weight (8 bits) in both paths, not identically
            errors = [((g - r).abs().max() / r.abs().max()).item() for g, r in zip(got, ref, strict=True)]
            bound = 2e-2 if autocast else 1e-4
            passed = all(e <= bound for e in errors)
            ok &= passed
            times = {}
            for name, kernels in (("reference", False), ("device_decode", True)):
                samples = []
                for _ in range(22):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    _step(layer, x, kernels=kernels, autocast=autocast)
                    end.record()
                    torch.cuda.synchronize()
                    samples.append(start.elapsed_time(end))
                times[name] = sorted(samples[2:])[len(samples[2:]) // 2]
            row = {
                "shape": shape,
                "tokens": args.tokens,
                "autocast_bf16": autocast,
                "max_rel_error": dict(zip(("output", "grad_input", "grad_scales"), errors, strict=True)),
                "bound": bound,
                "passed": passed,
                "fwd_bwd_ms": times,
            }
            doc["rows"].append(row)
            print(json.dumps(row), flush=True)
    doc["passed"] = ok
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
