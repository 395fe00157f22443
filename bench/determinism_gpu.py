"""Is a compression run bit-reproducible on the GPU? Compress the same random 2-block Llama
(SmolLM2's widths: hidden 576, intermediate 1536) twice per method, with block fine-tuning, and
compare every tensor of the results, once with PyTorch's default kernels and once with
``trainer.deterministic`` (lit_cb's default: ``lit_cb.pipeline.use_deterministic_kernels``).

    python bench/determinism_gpu.py --out $OUT/determinism_h100.json

The default kernels sum k-means centroids and codebook gradients with atomics, so two runs differ;
the deterministic ones must give identical tensors.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2_h100 import provenance  # noqa: E402

METHODS = {
    "codebook_g4_b8": {"method": "codebook", "method_config": {"in_group_size": 4, "nbits": 8, "kmeans_iters": 10}},
    "aqlm_2x8_g8": {
        "method": "aqlm",
        "method_config": {"num_codebooks": 2, "nbits_per_codebook": 8, "in_group_size": 8, "max_epochs": 3},
    },
}


def small_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=2048,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=2,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def compress_once(method: dict) -> dict[str, torch.Tensor]:
    from lit_cb.compress import CompressionConfig, compress_model

    model = small_llama()
    windows = torch.randint(0, 2048, (32, 256), generator=torch.Generator().manual_seed(0))
    cfg = CompressionConfig(**method, block_finetune={"epochs": 2, "batch_size": 4, "lr": 1e-4})
    compress_model(model, windows, cfg, device="cuda", progress=False)
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    max_diff = max((float((a[k].double() - b[k].double()).abs().max()) for k in differing), default=0.0)
    return {"identical": not differing, "tensors_differing": len(differing), "of": len(a), "max_abs_diff": max_diff}


def main() -> None:
    from lit_cb.pipeline import use_deterministic_kernels

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = {**provenance(sys.argv), "model": "random Llama, 2 blocks, hidden 576, intermediate 1536", "runs": {}}
    for mode in ("default_kernels", "deterministic"):
        if mode == "deterministic":
            use_deterministic_kernels()
        for name, method in METHODS.items():
            t = time.perf_counter()
            first = compress_once(method)
            second = compress_once(method)
            entry = {**compare(first, second), "seconds_for_two_runs": round(time.perf_counter() - t, 1)}
            result["runs"][f"{mode}/{name}"] = entry
            print(mode, name, entry, flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
