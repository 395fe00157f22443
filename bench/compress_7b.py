"""Compress a LLaMA-7B-shaped model (random weights) with ``compress_model`` on one GPU: time per
block, peak GPU memory per stage, peak CPU RSS, and the projection to all 32 blocks.

The float model stays on the CPU; one block at a time goes to the GPU; the calibration activations
live on the CPU in pinned memory (``offload_activations``) and stream to the GPU batch by batch.
Speed and memory depend on shapes, not values, so random weights and random tokens stand in for
LLaMA-7B and C4 (the quality of the result means nothing here).

    python bench/compress_7b.py --methods codebook --layers 2 --out $OUT/compress_7b_codebook.json
    python bench/compress_7b.py --methods aqlm --layers 1 --out $OUT/compress_7b_aqlm.json
    python bench/compress_7b.py --methods trellis --layers 2 --out $OUT/compress_7b_trellis.json
    python bench/compress_7b.py --smoke --out /tmp/compress_7b_smoke.json   # CPU, tiny shapes, seconds

Methods use the compression sections of ``configs/llama7b_codebook.yaml`` (g4 B8, GPTVQ weighting),
``configs/llama7b_aqlm.yaml`` (2x8 g8, beam 8, tol 0.01, 5 block fine-tuning epochs) and
``configs/llama7b_trellis.yaml`` (L12 k2 walks in 32x8 tiles, Viterbi in block-LDLQ, 5 epochs), with
``keep_dense: 0`` (the salience pass would move the whole float model to the GPU; it is one
forward of the model, outside the per-block loop) and ``offload_activations: true``.
Block 0 is compressed with the same work as every other block, so the projection is
``capture + 32 x mean(block seconds)``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2_h100 import provenance  # noqa: E402

from lit_cb.run_summary import peak_rss_gb  # noqa: E402

LLAMA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "vocab_size": 32000}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "vocab_size": 512}
FULL_BLOCKS = 32
FT_KEYS = ("block", "epochs", "best_epoch", "initial_val_loss", "final_val_loss", "seconds")
CONFIGS = {"codebook": "llama7b_codebook.yaml", "aqlm": "llama7b_aqlm.yaml", "trellis": "llama7b_trellis.yaml"}
# --smoke: the same code path at tiny shapes and with a fraction of the iterations.
SMOKE_OVERRIDES = {
    "codebook": {"nbits": 4, "kmeans_iters": 2, "codebook_update_steps": 1},
    "aqlm": {
        "nbits_per_codebook": 4,
        "in_group_size": 4,
        "beam_size": 2,
        "max_epochs": 1,
        "codebook_steps": 2,
        "init_kmeans_iters": 2,
    },
    "trellis": {"state_bits": 8},
}


def build_model(shape: dict, layers: int, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        **shape,
        num_key_value_heads=shape["num_attention_heads"],
        num_hidden_layers=layers,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dtype)
    model.eval()
    return model


def compression_config(method: str, smoke: bool, finetune_epochs: int | None):
    from lit_cb.compress import CompressionConfig

    section = yaml.safe_load((ROOT / "configs" / CONFIGS[method]).read_text())["compression"]
    section["keep_dense"] = 0
    section["offload_activations"] = True
    if smoke:
        section["method_config"] = {**section["method_config"], **SMOKE_OVERRIDES[method]}
        section["forward_batch_size"] = 2
        if section.get("block_finetune"):
            section["block_finetune"] = {**section["block_finetune"], "epochs": 1, "batch_size": 2}
    if finetune_epochs is not None and section.get("block_finetune"):
        section["block_finetune"] = {**section["block_finetune"], "epochs": finetune_epochs}
    return CompressionConfig(**section)


def run_method(method: str, args, device: torch.device, shape: dict, dtype: torch.dtype) -> dict:
    from lit_cb.compress import bits_per_weight, compress_model

    config = compression_config(method, args.smoke, args.finetune_epochs)
    t = time.perf_counter()
    model = build_model(shape, args.layers, dtype)
    build_seconds = time.perf_counter() - t
    windows = torch.randint(
        0, shape["vocab_size"], (args.windows, args.seqlen), generator=torch.Generator().manual_seed(0)
    )
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    report = compress_model(model, windows, config, device=device, progress=not args.quiet)
    blocks = report.block_seconds
    capture = report.stages.get("capture", {}).get("seconds", 0.0)
    per_block = sum(blocks) / len(blocks)
    return {
        "config": config.to_dict(),
        "model_build_seconds": build_seconds,
        "block_seconds": blocks,
        "mean_block_seconds": per_block,
        "stages": report.stages,
        "peak_gpu_gb": report.peak_gpu_gb,
        "peak_cpu_rss_gb": peak_rss_gb(),
        "projected_seconds_32_blocks": capture + FULL_BLOCKS * per_block,
        "projected_hours_32_blocks": (capture + FULL_BLOCKS * per_block) / 3600,
        "bits_per_weight": bits_per_weight(model)["compressed_linears"],
        "mean_relative_error": sum(r.relative_error for r in report.layers) / len(report.layers),
        "block_finetune": [{k: v for k, v in ft.items() if k in FT_KEYS} for ft in report.block_finetune],
    }


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="codebook,aqlm", help="comma-separated: codebook, aqlm, trellis")
    parser.add_argument("--layers", type=int, default=2, help="decoder blocks to build and compress")
    parser.add_argument("--windows", type=int, default=128, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration window")
    parser.add_argument("--finetune-epochs", type=int, default=None, help="override block_finetune.epochs")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, few windows: a check in seconds")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--out", required=True, help="where to write the JSON")
    args = parser.parse_args(argv[1:])

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(CONFIGS))
    if unknown or not methods:
        parser.error(f"--methods {args.methods!r}: unknown {unknown}; allowed: {sorted(CONFIGS)}")
    for name in ("layers", "windows", "seqlen"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)} must be >= 1")
    out = Path(args.out)
    if out.exists():
        parser.error(f"--out {out} exists; not overwriting it")

    if args.smoke:
        device, shape = torch.device("cpu"), TINY
        if "--windows" not in " ".join(argv):
            args.windows = 4
        if "--seqlen" not in " ".join(argv):
            args.seqlen = 32
        dtype = torch.float32
        torch.set_num_threads(1)  # a check on a shared CPU: oversubscribed OpenMP threads only spin
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/compress_7b.py needs a GPU (or --smoke for the CPU check)")
        device, shape = torch.device("cuda", torch.cuda.current_device()), LLAMA_7B
        dtype = getattr(torch, args.dtype)
        from lit_cb.pipeline import use_deterministic_kernels

        use_deterministic_kernels()  # what the recipes do (trainer.deterministic: true)

    result = {
        **provenance(argv),
        "model": {**shape, "num_hidden_layers": args.layers, "dtype": str(dtype).removeprefix("torch.")},
        "calibration": {"windows": args.windows, "seqlen": args.seqlen, "tokens": "uniform random"},
        "smoke": args.smoke,
        "methods": {},
    }
    for method in methods:
        result["methods"][method] = run_method(method, args, device, shape, dtype)
        r = result["methods"][method]
        gpu = f", peak GPU {r['peak_gpu_gb']:.2f} GB" if r["peak_gpu_gb"] is not None else ""
        print(
            f"{method}: {r['mean_block_seconds']:.1f} s/block{gpu}, peak RSS {r['peak_cpu_rss_gb']:.1f} GB, "
            f"projected {r['projected_hours_32_blocks']:.2f} h for 32 blocks",
            flush=True,
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
