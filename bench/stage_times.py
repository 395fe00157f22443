"""What each stage of a SmolLM2-135M quality run costs on one GPU, alone (issue 14's run planning).

    python bench/stage_times.py --out $OUT            # random weights in SmolLM2-135M's shapes: no GGUF

A 30-minute device session holds one machine whose warm window between calls is 30 s, and chaining
long calls across that window failed twice (bench/README.md, sessions 6 and 7). So every quality run
must be planned to fit one call of at most 10 minutes, and that needs each stage's cost measured
alone, not side by side:

* ``teacher``: tokens/s of teacher-text sampling (:func:`lit_cb.generate.generate`, static KV cache,
  one CUDA graph replay per token, fp16, temperature 1, top-p 0.95) for each ``--teacher-shapes``
  ``ROWSxSEQLEN``: the static cache spans the whole sequence, so a step's cost grows with SEQLEN;
* ``compress``: seconds per block of the committed ``smollm2_codebook_best`` compression (g4 B8,
  GPTVQ weighting, 30 k-means iterations, 5 block fine-tuning epochs, 128 x 2048 calibration
  windows) over ``--blocks`` blocks, and the same without block fine-tuning: the difference is the
  fine-tuning's share.

Random weights do not change the teacher text's cost. They do change compression's: k-means stops at
its tolerance, which random weights may reach sooner than real ones, so the compression seconds are
a lower bound (block fine-tuning runs every epoch: its patience is set to the epoch count).
Everything is written to ``--out/stage_times.json`` as it is measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from lit_cb.environment import package_versions
from lit_cb.models import random_smollm2

ROOT = Path(__file__).resolve().parents[1]


def _shape(text: str) -> tuple[int, int]:
    rows, _, seqlen = text.partition("x")
    try:
        out = int(rows), int(seqlen)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not ROWSxSEQLEN (e.g. 128x2048)") from None
    if min(out) < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: rows and seqlen must be at least 2")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--parts", default="teacher,compress", help="comma-separated: teacher, compress")
    ap.add_argument(
        "--teacher-shapes",
        type=lambda s: [_shape(x) for x in s.split(",")],
        default=[_shape(x) for x in "128x512,512x512,128x2048,256x2048".split(",")],
    )
    ap.add_argument("--blocks", type=int, default=2, help="blocks compressed per compression variant")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes (checks the script runs)")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    unknown = parts - {"teacher", "compress"}
    if unknown:
        ap.error(f"--parts {sorted(unknown)}: allowed are teacher, compress")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    result: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "versions": package_versions(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python " + shlex.join(sys.argv),
        "model": "random weights, SmolLM2-135M shapes" + (" (2 layers: --smoke)" if args.smoke else ""),
        "teacher": [],
        "compress": {},
    }

    def dump() -> None:
        (out / "stage_times.json").write_text(json.dumps(result, indent=1))

    if "teacher" in parts:
        from lit_cb.generate import generate

        model = random_smollm2(2 if args.smoke else 30)
        model.generation_config.eos_token_id = None
        model = model.to(device=device, dtype=torch.float16 if device.type == "cuda" else torch.float32).eval()
        shapes = [(4, 16)] if args.smoke else args.teacher_shapes
        for rows, seqlen in shapes:
            prompt = torch.randint(0, 49152, (rows, 1), generator=torch.Generator().manual_seed(rows)).to(device)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            new, stats = generate(
                model,
                None,
                prompt,
                max_new_tokens=seqlen - 1,
                temperature=1.0,
                top_p=0.95,
                seed=0,
                compile_backend="graph" if device.type == "cuda" else None,
                warn=print,
            )
            if device.type == "cuda":
                torch.cuda.synchronize()
            sec = time.perf_counter() - t
            row = {
                "rows": rows,
                "seqlen": seqlen,
                "seconds": round(sec, 2),
                "tokens_per_second": round(rows * seqlen / sec, 1),
                "decode_tok_s": round(stats.decode_tok_s, 1),
                "seconds_per_step": round(sec / (seqlen - 1), 5),
                "backend": stats.compile_backend,
                "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
            }
            result["teacher"].append(row)
            print("teacher", row, flush=True)
            dump()
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if "compress" in parts:
        from lit_cb.compress import compress_model
        from lit_cb.configs.compression import CompressionConfig

        blocks = 1 if args.smoke else args.blocks
        seqlen, n = (64, 8) if args.smoke else (2048, 128)
        windows = torch.randint(0, 49152, (n, seqlen), generator=torch.Generator().manual_seed(1))
        method = {"in_group_size": 4, "nbits": 8, "weighting": "gptvq", "kmeans_iters": 2 if args.smoke else 30}
        for name, finetune in (
            # patience = epochs: on random weights the held-out loss hardly improves, and the default
            # patience of 1 stopped fine-tuning after one epoch (2026-12-03: 5.2 s per block here against
            # 15.7 in a real run); every epoch runs, as on the real model.
            ("best_config", {"epochs": 5, "lr": 1e-4, "batch_size": 8, "patience": 5}),
            ("no_block_finetune", None),
        ):
            model = random_smollm2(blocks)
            cfg = CompressionConfig(
                method="codebook", method_config=method, forward_batch_size=16, block_finetune=finetune
            )
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            compress_model(model, windows, cfg, device=device, progress=False)
            if device.type == "cuda":
                torch.cuda.synchronize()
            sec = time.perf_counter() - t
            result["compress"][name] = {
                "blocks": blocks,
                "seconds": round(sec, 2),
                "seconds_per_block": round(sec / blocks, 2),
            }
            print("compress", name, result["compress"][name], flush=True)
            dump()
            del model
    dump()


if __name__ == "__main__":
    main()
