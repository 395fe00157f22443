"""Every supported model family on the GPU: compress a random 2-block model of each family with
block fine-tuning, then compare its logits through the Triton kernels with the PyTorch reference
at 1, 16 and 128 tokens (gemv / mm / dense dispatch) and greedily generate with the KV cache.

    python bench/families_gpu.py --out $OUT/families_h100.json
    python bench/families_gpu.py --smoke --out /tmp/families_smoke.json   # CPU, tiny widths, reference only

No weights are needed (random models from each family's transformers config class); CI covers the
same families on tiny CPU models in tests/test_families.py.
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


def family_config(family: str, hidden: int, intermediate: int, heads: int, vocab: int):
    import transformers as T

    ids = dict(bos_token_id=1, eos_token_id=1, pad_token_id=1)
    llama_like = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        max_position_embeddings=1024,
        **ids,
    )
    head_dim = hidden // heads
    return {
        "llama": lambda: T.LlamaConfig(**llama_like),
        "mistral": lambda: T.MistralConfig(**llama_like),
        "qwen2": lambda: T.Qwen2Config(**llama_like),
        "qwen3": lambda: T.Qwen3Config(**llama_like, head_dim=head_dim),
        "gemma": lambda: T.GemmaConfig(**llama_like, head_dim=head_dim),
        "gemma2": lambda: T.Gemma2Config(**llama_like, head_dim=head_dim),
        "phi3": lambda: T.Phi3Config(**llama_like),
        "gpt_neox": lambda: T.GPTNeoXConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=2,
            num_attention_heads=heads,
            max_position_embeddings=1024,
            **ids,
        ),
        "opt": lambda: T.OPTConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            ffn_dim=intermediate,
            word_embed_proj_dim=hidden,
            num_hidden_layers=2,
            num_attention_heads=heads,
            max_position_embeddings=1024,
            **ids,
        ),
    }[family]()


def run_family(family: str, args, device: torch.device) -> dict:
    from transformers import AutoModelForCausalLM

    from lit_cb.compress import CompressionConfig, bits_per_weight, compress_model
    from lit_cb.layers import CodebookLinear

    torch.manual_seed(0)
    cfg = family_config(family, args.hidden, args.intermediate, args.heads, args.vocab)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    windows = torch.randint(2, args.vocab, (args.windows, args.seqlen), generator=torch.Generator().manual_seed(0))
    ccfg = CompressionConfig(
        method="codebook",
        method_config={"in_group_size": 4, "nbits": 8, "kmeans_iters": args.kmeans_iters},
        block_finetune={"epochs": 1, "batch_size": 4, "lr": 1e-4},
    )
    t = time.perf_counter()
    report = compress_model(model, windows, ccfg, device=device, progress=False)
    entry: dict = {"compress_seconds": round(time.perf_counter() - t, 2), "layers": len(report.layers)}
    entry["bits_per_weight"] = bits_per_weight(model)["compressed_linears"]
    dtype = torch.bfloat16 if family in ("gemma2", "qwen2") else torch.float16
    model.to(device=device, dtype=dtype)
    layers = [m for m in model.modules() if isinstance(m, CodebookLinear)]
    entry["logits_rel_diff_kernels_vs_reference"] = {}
    for tokens in (1, 16, 128):
        ids = windows[:1, :tokens].to(device)
        with torch.no_grad():
            for m in layers:
                m.use_kernels = True
            fast = model(input_ids=ids, use_cache=False).logits.float()
            for m in layers:
                m.use_kernels = False
            ref = model(input_ids=ids, use_cache=False).logits.float()
        entry["logits_rel_diff_kernels_vs_reference"][tokens] = float((fast - ref).norm() / ref.norm())
    for m in layers:
        m.use_kernels = True
    with torch.no_grad():
        t = time.perf_counter()
        out = model.generate(windows[:1, :8].to(device), max_new_tokens=16, do_sample=False)
    entry["generate_new_tokens"] = int(out.shape[1] - 8)
    entry["generate_seconds"] = round(time.perf_counter() - t, 3)
    return entry


def main() -> None:
    from lit_cb.architectures import FAMILIES

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny widths, reference forward only")
    parser.add_argument("--families", nargs="*", default=list(FAMILIES))
    args = parser.parse_args()
    if args.smoke:
        args.hidden, args.intermediate, args.heads, args.vocab = 64, 128, 4, 512
        args.windows, args.seqlen, args.kmeans_iters = 8, 128, 2
        device = torch.device("cpu")
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no GPU visible; use --smoke on a CPU")
        args.hidden, args.intermediate, args.heads, args.vocab = 1024, 2816, 16, 4096
        args.windows, args.seqlen, args.kmeans_iters = 32, 512, 10
        device = torch.device("cuda")
    result = {
        **provenance(sys.argv),
        "model": f"random 2-block model per family, hidden {args.hidden}, intermediate {args.intermediate}",
        "method": "codebook g4 B8 + 1 block fine-tuning epoch",
        "families": {},
    }
    for family in args.families:
        try:
            result["families"][family] = run_family(family, args, device)
        except Exception as err:  # one family's failure must not hide the others'
            result["families"][family] = {"error": f"{type(err).__name__}: {err}"}
        print(family, json.dumps(result["families"][family]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    failed = [f for f, e in result["families"].items() if "error" in e]
    if failed:
        raise SystemExit(f"failed families: {failed}")


if __name__ == "__main__":
    main()
