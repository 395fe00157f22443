"""Issue 14's calibration-pool question, measured: does cutting calibration windows from all C4 documents
joined (``concat``) instead of from the few long ones (``document``, GPTQ/AQLM's loader) lower the error?

The shipped C4 sample has 1,000 documents but only 32 longer than 2,048 tokens, so ``document`` sampling draws
all 128 full-protocol windows from those 32. This compresses the first ``--blocks`` blocks of the model with the
product's own driver (:func:`lit_cb.compress.compress_model`, the config's method and settings, any overrides:
block fine-tuning included unless turned off), the rest of the model left float, once per sampling and seed, and
measures WikiText-2 on the first ``--eval-windows`` test windows. Runs of one seed share the model, the test
windows and everything but the calibration windows, so the two samplings are compared seed by seed (paired).

A CPU probe: a few blocks stand for the model (errors compound through them as in a full run), and block
fine-tuning is usually turned off for time (``compression.block_finetune.epochs=0``), so the figures measure the
pool's effect on the Hessian-aware codes. The GPU answer is a full run of the config with the sampling set.

    python bench/calibration_pool_probe.py --config configs/smollm2_aqlm_full.yaml --blocks 2 --seeds 0,1,2 \\
        --eval-windows 16 --out R.json compression.block_finetune.epochs=0
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

SAMPLINGS = ("document", "concat", "teacher")


def teacher_calibration(folder: Path, num: int, seqlen: int, seed: int) -> torch.Tensor:
    """``num`` windows of ``seqlen`` tokens, each ``seqlen / L`` random sequences of a teacher-text cache (the
    float model's own samples, ``[S, L]`` in ``folder/tokens.safetensors``, as recovery's teacher text is)
    joined: calibration without any dataset (LLM-QAT's data-free idea, applied to the Hessians)."""
    from lit_cb.data.teacher_text import read_tokens

    tokens = read_tokens(folder / "tokens.safetensors")
    per = tokens.shape[1]
    if seqlen % per:
        raise ValueError(f"calibration_seqlen {seqlen} is not a multiple of the teacher sequences' {per} tokens")
    k = seqlen // per
    if num * k > tokens.shape[0]:
        raise ValueError(f"{num} windows need {num * k} teacher sequences; {folder} holds {tokens.shape[0]}")
    pick = torch.randperm(tokens.shape[0], generator=torch.Generator().manual_seed(seed))[: num * k]
    return tokens[pick].reshape(num, seqlen).long()


@contextmanager
def truncated_to(model: nn.Module, num_blocks: int) -> Iterator[None]:
    """``model``'s decoder blocks cut to the first ``num_blocks`` inside the ``with`` (the same module objects, so
    what is done to them stays when the full list is put back, also after an error)."""
    from lit_cb.models import decoder_layers

    layers = decoder_layers(model)
    kept = list(layers)
    del layers[num_blocks:]
    try:
        yield
    finally:
        layers.extend(kept[num_blocks:])


def probe(
    config: Path,
    overrides: list[str],
    num_blocks: int,
    sampling: str,
    seed: int,
    eval_windows: int,
    teacher_dir: Path | None = None,
) -> dict[str, float]:
    """Compress the first ``num_blocks`` blocks calibrated with ``sampling`` windows of ``seed``; WikiText-2."""
    from lit_cb.compress import compress_model
    from lit_cb.config import load_config
    from lit_cb.data.datamodule import CompressionDataModule
    from lit_cb.evaluate import perplexity
    from lit_cb.models import load_model

    cfg = load_config(
        config,
        [
            *overrides,
            f"data.calibration_sampling={'concat' if sampling == 'teacher' else sampling}",
            f"seed={seed}",
            f"data.seed={seed}",
            f"data.max_eval_windows={eval_windows}",
        ],
    )
    torch.manual_seed(seed)
    model, tokenizer = load_model(cfg.model.name, cfg.model.dtype)
    dm = CompressionDataModule(tokenizer, cfg.data)
    if sampling == "teacher":
        windows = teacher_calibration(teacher_dir, cfg.data.num_calibration_samples, cfg.data.calibration_seqlen, seed)
    else:
        windows = dm.calibration_windows()
    t0 = time.perf_counter()
    with truncated_to(model, num_blocks):
        report = compress_model(model, windows, cfg.compression, device="cpu", progress=False)
    seconds = time.perf_counter() - t0
    sizes = [r.shape[0] * r.shape[1] for r in report.layers]
    return {
        "ppl": perplexity(model, dm.test_windows(), progress=False),
        "compress_seconds": seconds,
        "bits_per_weight": sum(r.bits_per_weight * n for r, n in zip(report.layers, sizes, strict=True)) / sum(sizes),
        # each layer's error relative to its own calibration Hessian: not comparable across samplings
        "mean_layer_relative_error": statistics.fmean(r.relative_error for r in report.layers),
    }


def float_ppl(config: Path, overrides: list[str], eval_windows: int) -> float:
    from lit_cb.config import load_config
    from lit_cb.data.datamodule import CompressionDataModule
    from lit_cb.evaluate import perplexity
    from lit_cb.models import load_model

    cfg = load_config(config, [*overrides, f"data.max_eval_windows={eval_windows}"])
    model, tokenizer = load_model(cfg.model.name, cfg.model.dtype)
    return perplexity(model, CompressionDataModule(tokenizer, cfg.data).test_windows(), progress=False)


def summary(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--blocks", type=int, default=2, help="blocks compressed from the first (default 2)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--samplings", default="document,concat", help=f"any of {','.join(SAMPLINGS)}")
    ap.add_argument("--teacher-dir", type=Path, help="a teacher-text cache folder (tokens.safetensors), for 'teacher'")
    ap.add_argument("--eval-windows", type=int, default=16, help="WikiText-2 test windows measured (default 16)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    samplings = args.samplings.split(",")
    bad = [s for s in samplings if s not in SAMPLINGS]
    if bad:
        ap.error(f"--samplings {args.samplings}: {bad} not in {list(SAMPLINGS)}")
    if "teacher" in samplings and (args.teacher_dir is None or not (args.teacher_dir / "tokens.safetensors").is_file()):
        ap.error(f"--samplings teacher needs --teacher-dir with a tokens.safetensors (got {args.teacher_dir})")
    if args.blocks < 1:
        ap.error(f"--blocks {args.blocks}: must be >= 1")
    if args.eval_windows < 1:
        ap.error(f"--eval-windows {args.eval_windows}: must be >= 1")
    if args.out.exists():
        ap.error(f"--out {args.out} exists; choose another path (nothing is overwritten)")
    from lit_cb.config import load_config

    load_config(args.config, args.overrides)  # bad keys or values fail here, before any work

    result = {
        "what": f"calibration pool ({' vs '.join(samplings)}), first {args.blocks} blocks compressed, rest float",
        "command": " ".join(["python", *sys.argv]) if argv is None else " ".join(["python", __file__, *argv]),
        "config": str(args.config),
        "overrides": args.overrides,
        "blocks": args.blocks,
        "eval_windows": args.eval_windows,
        "device": f"CPU {platform.machine()} ({torch.get_num_threads()} threads)",
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "float_ppl": float_ppl(args.config, args.overrides, args.eval_windows),
        "per_seed": {},
    }
    print(f"float: {result['float_ppl']:.3f}", flush=True)
    for seed in seeds:
        row = result["per_seed"].setdefault(str(seed), {})
        for sampling in samplings:
            row[sampling] = probe(
                args.config, args.overrides, args.blocks, sampling, seed, args.eval_windows, args.teacher_dir
            )
            print(f"seed {seed} {sampling}: {row[sampling]}", flush=True)
            args.out.write_text(json.dumps(result, indent=1))  # partial results survive an interruption
    result["summary"] = {s: summary([r[s]["ppl"] for r in result["per_seed"].values() if s in r]) for s in samplings}
    for other in ("concat", "teacher"):
        if other in samplings and "document" in samplings:
            diffs = [r[other]["ppl"] - r["document"]["ppl"] for r in result["per_seed"].values()]
            result["summary"][f"{other}_minus_document"] = {**summary(diffs), "per_seed": diffs}
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))
    return result


if __name__ == "__main__":
    main()
