"""AQLM time and peak GPU memory for one LLaMA-7B-shaped block (random weights), and the projection
to a whole 7B model (32 blocks). Speed does not depend on the weight values, so random weights and
a random (correlated) calibration Hessian stand in for the real ones.

    python bench/aqlm_7b_block.py --presets 2x8_g8,1x16_g8 --out $OUT/aqlm_7b_block.json

Per preset: every linear of the block is quantized with ``quantize_aqlm`` (beam 8, tol 0.01, the
full-protocol settings of configs/smollm2_aqlm_full.yaml) and the block is then fine-tuned for one
epoch on ``--windows`` calibration windows; the projection multiplies by 32 blocks and by the
configured number of fine-tuning epochs.
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

LINEARS = {  # name: (out, in)
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (4096, 4096),
    "self_attn.v_proj": (4096, 4096),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (11008, 4096),
    "mlp.up_proj": (11008, 4096),
    "mlp.down_proj": (4096, 11008),
}
PRESETS = {"2x8_g8": (2, 8), "1x16_g8": (1, 16)}


def random_hessian(dim: int, tokens: int, gen: torch.Generator) -> torch.Tensor:
    mix = torch.randn(dim, dim, device="cuda", generator=gen) / dim**0.5
    x = torch.randn(tokens, dim, device="cuda", generator=gen) @ mix
    return x.T @ x / tokens


def main() -> None:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from lit_cb.block_finetune import BlockFinetuneConfig, finetune_block
    from lit_cb.quant.aqlm import AQLMConfig, quantize_aqlm

    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", default="2x8_g8,1x16_g8")
    parser.add_argument("--windows", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--max-epochs-1x16", type=int, default=None, help="cap alternations for 1x16 (time)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    gen = torch.Generator(device="cuda").manual_seed(0)
    hessians = {d: random_hessian(d, 8192, gen) for d in (4096, 11008)}
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
    result = {**provenance(sys.argv), "shape": "LLaMA-7B block (4096 hidden, 11008 intermediate)", "presets": {}}
    for preset in args.presets.split(","):
        m, b = PRESETS[preset]
        extra = {"max_epochs": args.max_epochs_1x16} if (preset == "1x16_g8" and args.max_epochs_1x16) else {}
        qcfg = AQLMConfig(
            num_codebooks=m,
            nbits_per_codebook=b,
            in_group_size=8,
            beam_size=8,
            relative_tol=0.01,
            max_chunk_elements=2**28,
            **extra,
        )
        torch.manual_seed(0)
        block = LlamaDecoderLayer(cfg, layer_idx=0).cuda().float()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        layers = {}
        t_block = time.perf_counter()
        for name, (out_f, in_f) in LINEARS.items():
            t = time.perf_counter()
            linear = block.get_submodule(name)
            new = quantize_aqlm(linear.weight.detach().float(), hessians[in_f], qcfg, None)
            torch.cuda.synchronize()
            parent, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent), child, new)
            layers[name] = {"seconds": time.perf_counter() - t, "shape": f"{out_f}x{in_f}"}
            print(f"[{preset}] {name} {out_f}x{in_f}: {layers[name]['seconds']:.1f} s", flush=True)
        quantize_s = time.perf_counter() - t_block
        quantize_peak = torch.cuda.max_memory_allocated() / 2**30

        # One fine-tuning epoch on random calibration activations (time scales linearly in epochs).
        inputs = torch.randn(args.windows, args.seqlen, 4096, device="cuda", generator=gen) * 0.5
        rotary = LlamaRotaryEmbedding(cfg).cuda()
        pos = torch.arange(args.seqlen, device="cuda")[None]
        kwargs = {"position_embeddings": rotary(inputs[:1], pos), "attention_mask": None, "use_cache": False}
        with torch.no_grad():
            targets = torch.cat([block(inputs[i : i + 8], **kwargs) for i in range(0, args.windows, 8)])
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        finetune_block(block, inputs, targets, kwargs, BlockFinetuneConfig(epochs=1, batch_size=8, patience=1))
        torch.cuda.synchronize()
        finetune_epoch_s = time.perf_counter() - t
        finetune_peak = torch.cuda.max_memory_allocated() / 2**30
        per_block = quantize_s + args.finetune_epochs * finetune_epoch_s
        result["presets"][preset] = {
            "layers": layers,
            "quantize_seconds_per_block": quantize_s,
            "finetune_seconds_per_epoch": finetune_epoch_s,
            "finetune_epochs": args.finetune_epochs,
            "seconds_per_block": per_block,
            "projected_hours_7b_32_blocks": 32 * per_block / 3600,
            "peak_gpu_gb_quantize": quantize_peak,
            "peak_gpu_gb_finetune": finetune_peak,
            "config": qcfg.to_dict(),
        }
        print(
            f"[{preset}] block: quantize {quantize_s:.0f} s, finetune {finetune_epoch_s:.0f} s/epoch, "
            f"projected 7B {32 * per_block / 3600:.2f} h",
            flush=True,
        )
        Path(args.out).write_text(json.dumps(result, indent=1))
        del block, inputs, targets
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
