"""Cost of one discrete code update (PV-tuning's linearized V-step, ``lit_cb.quant.code_update``) per
layer shape and for whole models: the gradient capture's ``grad_outᵀ x`` matmul over a batch's tokens
plus ``linearized_v_step`` (target, selection, coordinate-descent assignment) on random codes.

    source bench/device_setup.sh && python bench/code_update.py --out $OUT/code_update_h100.json
    python bench/code_update.py --smoke --out /tmp/code_update_smoke.json      # CPU, tiny shapes, seconds

Rows: SmolLM2-135M's linears (576 hidden, 1536 MLP, 30 blocks; K/V 192 wide) in codebook g4 B8 (1x8)
and AQLM 2x8 g8, and one LLaMA-7B block (4096 / 11008) in 1x16 g8 and 2x8 g8; ``--fraction`` of the
groups (default 0.01), ``--tokens`` tokens per step (default 4 x 2048), 2 sweeps. Per model: the sum
over its linears x blocks (the cost of one ``CodeUpdateCallback`` call, excluding the step's
forward/backward). Random weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lit_cb.quant.code_update import linearized_v_step  # noqa: E402

SMOLLM2 = {
    "q": (576, 576),
    "k": (192, 576),
    "v": (192, 576),
    "o": (576, 576),
    "gate": (1536, 576),
    "up": (1536, 576),
    "down": (576, 1536),
}
LLAMA7B = {
    "q": (4096, 4096),
    "k": (4096, 4096),
    "v": (4096, 4096),
    "o": (4096, 4096),
    "gate": (11008, 4096),
    "up": (11008, 4096),
    "down": (4096, 11008),
}
FORMATS = {"1x8_g4": (1, 8, 4), "2x8_g8": (2, 8, 8), "1x16_g8": (1, 16, 8)}
MODELS = {"smollm2_135m": (SMOLLM2, 30, ["1x8_g4", "2x8_g8"]), "llama7b": (LLAMA7B, 32, ["1x16_g8", "2x8_g8"])}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_layer(out_f: int, in_f: int, fmt: str, tokens: int, fraction: float, device: torch.device, reps: int) -> dict:
    m, nbits, g = FORMATS[fmt]
    gen = torch.Generator(device="cpu").manual_seed(0)
    codes = torch.randint(0, 2**nbits, (out_f, in_f // g, m), generator=gen).to(device)
    codebooks = (torch.randn(m, 2**nbits, 1, g, generator=gen) * 0.5).to(device)
    scales = (torch.rand(out_f, generator=gen) + 0.5).to(device)
    x = torch.randn(tokens, in_f, generator=gen).to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    grad_out = torch.randn(tokens, out_f, generator=gen).to(device, x.dtype)
    sq = x.float().square().mean(0)
    linearized_v_step(codes, codebooks, scales, grad_out.float().T @ x.float(), sq, fraction, 0.5, 2)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        grad = grad_out.float().T @ x.float()
    _sync(device)
    t1 = time.perf_counter()
    for _ in range(reps):
        _, _, stats = linearized_v_step(codes, codebooks, scales, grad, sq, fraction, 0.5, 2)
    _sync(device)
    t2 = time.perf_counter()
    return {
        "shape": [out_f, in_f],
        "format": fmt,
        "grad_ms": (t1 - t0) / reps * 1e3,
        "v_step_ms": (t2 - t1) / reps * 1e3,
        "groups": stats.groups,
        "groups_changed": stats.groups_changed,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=4 * 2048)
    ap.add_argument("--fraction", type=float, default=0.01)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="CPU-sized shapes (a check that the script runs)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = MODELS
    if args.smoke:
        models = {"smoke": ({"a": (64, 128), "b": (128, 64)}, 2, ["1x8_g4", "2x8_g8"])}
        args.tokens, args.reps = min(args.tokens, 256), 1
    record = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(),
        "command": shlex.join([sys.executable, *sys.argv]),
        "tokens": args.tokens,
        "fraction": args.fraction,
        "smoke": args.smoke,
        "models": {},
    }
    try:
        import triton

        record["triton"] = triton.__version__
    except ImportError:
        record["triton"] = None
    import transformers

    record["transformers"] = transformers.__version__
    for name, (shapes, blocks, fmts) in models.items():
        for fmt in fmts:
            rows = [time_layer(o, i, fmt, args.tokens, args.fraction, device, args.reps) for o, i in shapes.values()]
            total_grad = sum(r["grad_ms"] for r in rows) * blocks / 1e3
            total_v = sum(r["v_step_ms"] for r in rows) * blocks / 1e3
            record["models"][f"{name}_{fmt}"] = {
                "blocks": blocks,
                "layers": dict(zip(shapes, rows, strict=True)),
                "per_call_grad_s": total_grad,
                "per_call_v_step_s": total_v,
                "per_call_total_s": total_grad + total_v,
            }
            print(f"{name} {fmt}: grad {total_grad:.2f} s + V-step {total_v:.2f} s per code update", flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
