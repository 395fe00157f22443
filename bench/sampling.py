"""Per-token sampling cost of the decode loop: lit_cb.generate._pick against the sampler it replaced.

    python bench/sampling.py --out $OUT/sampling.json          # GPU: batch 128, SmolLM2's 49,152 vocabulary
    python bench/sampling.py --smoke --out /tmp/sampling.json  # CPU, tiny shapes, seconds

The replaced sampler (``previous`` below, kept here only to measure it) sorted the probabilities,
scattered the kept ones back to vocabulary order into a zero tensor and drew with torch.multinomial,
whose input checks read two values back to the host on every call. ``_pick`` draws in sorted order
(no zero tensor, no scatter) by an exponential race, with no host read. Two timings per variant:
``gpu_ms`` (CUDA events around one call: the kernels alone) and ``queued_ms`` (wall time per call of a
loop of calls with one synchronize at the end: what the decode loop sees, host syncs included).
The JSON holds the device, versions, date and the command.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lit_cb.generate import _pick  # noqa: E402


def previous(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """The sampler lit_cb used before (sort, scatter back, torch.multinomial)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p.masked_fill(drop, 0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, logits, temperature, top_p, device, calls: int) -> dict:
    generator = torch.Generator(device=device).manual_seed(0)
    for _ in range(3):
        fn(logits, temperature, top_p, generator)
    _sync(device)
    out: dict = {}
    if device.type == "cuda":
        times = []
        for _ in range(calls):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(logits, temperature, top_p, generator)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        times.sort()
        out["gpu_ms"] = times[len(times) // 2]
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(logits, temperature, top_p, generator)
    _sync(device)
    out["queued_ms"] = (time.perf_counter() - t0) / calls * 1e3
    return out


def _versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception as err:  # noqa: BLE001 (recorded, not fatal)
        out["triton"] = f"unavailable ({err})"
    import transformers

    out["transformers"] = transformers.__version__
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="the JSON file to write")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    batch, vocab, calls = (4, 512, 10) if args.smoke else (args.batch, args.vocab, args.calls)
    # Logits with a language model's spread: a few likely tokens, a long tail.
    logits = (4 * torch.randn(batch, vocab, generator=torch.Generator().manual_seed(0))).to(device, torch.float16)
    rows = []
    for temperature, top_p in ((1.0, 1.0), (1.0, 0.95), (0.7, 0.9)):
        for name, fn in (("previous", previous), ("_pick", _pick)):
            rows.append(
                {
                    "sampler": name,
                    "temperature": temperature,
                    "top_p": top_p,
                    **measure(fn, logits, temperature, top_p, device, calls),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": _versions(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python " + shlex.join(sys.argv),
        "batch": batch,
        "vocab": vocab,
        "calls": calls,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
