"""AQLM time and peak GPU memory for one LLaMA-7B-shaped block (random weights), and the projection
to a whole 7B model (32 blocks). Speed does not depend on the weight values, so random weights and
a random (correlated) calibration Hessian stand in for the real ones.

    python bench/aqlm_7b_block.py --presets 2x8_g8,1x16_g8 --out $OUT/aqlm_7b_block.json

Per preset: every linear of the block is quantized with ``quantize_aqlm`` (beam 8, tol 0.01, the
full-protocol settings of configs/smollm2_aqlm_full.yaml) and the block is then fine-tuned for one
epoch on ``--windows`` calibration windows; the projection multiplies by 32 blocks and by the
configured number of fine-tuning epochs.

Quantization time depends on a layer's shape, not its values, so ``--one-per-shape`` times one
linear of each distinct shape (q_proj for the four 4096x4096 ones, gate_proj for up_proj) and
counts its time for the siblings, which are marked ``timed_as``. A preset too slow for one command
(1x16 takes minutes per layer) is measured in parts with ``--linears`` and joined with ``--merge``:

    python bench/aqlm_7b_block.py --presets 1x16_g8 --one-per-shape --linears self_attn.q_proj,mlp.gate_proj \
        --skip-finetune --out $OUT/part_a.json
    python bench/aqlm_7b_block.py --presets 1x16_g8 --linears mlp.down_proj --out $OUT/part_b.json
    python bench/aqlm_7b_block.py --merge part_a.json part_b.json --out aqlm_7b_block_h100.json
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


def block_totals(entry: dict, finetune_epochs: int) -> None:
    """Fill a preset's block total and 7B projection once every linear has a time (in place)."""
    layers = entry["layers"]
    by_shape = {layer["shape"]: layer["seconds"] for layer in layers.values()}
    for name, (out_f, in_f) in LINEARS.items():
        shape = f"{out_f}x{in_f}"
        if name not in layers and shape in by_shape:
            twin = next(n for n, layer in layers.items() if layer["shape"] == shape)
            layers[name] = {"seconds": by_shape[shape], "shape": shape, "timed_as": twin}
    missing = [name for name in LINEARS if name not in layers]
    if missing or entry.get("finetune_seconds_per_epoch") is None:
        entry["incomplete"] = {"missing_linears": missing, "finetune_timed": "finetune_seconds_per_epoch" in entry}
        return
    entry.pop("incomplete", None)
    quantize_s = sum(layers[name]["seconds"] for name in LINEARS)
    per_block = quantize_s + finetune_epochs * entry["finetune_seconds_per_epoch"]
    entry.update(
        quantize_seconds_per_block=quantize_s,
        finetune_epochs=finetune_epochs,
        seconds_per_block=per_block,
        projected_hours_7b_32_blocks=32 * per_block / 3600,
    )


def merge(paths: list[str], out: str) -> None:
    """Join partial results of the same presets (layer times, fine-tuning time, peaks, commands)."""
    docs = [json.loads(Path(p).read_text()) for p in paths]
    result = {k: v for k, v in docs[0].items() if k not in ("presets", "command")}
    result["commands"] = [d["command"] for d in docs]
    result["presets"] = {}
    for doc in docs:
        for preset, entry in doc["presets"].items():
            into = result["presets"].setdefault(preset, {"layers": {}})
            into["layers"].update({n: v for n, v in entry["layers"].items() if "timed_as" not in v})
            for key, value in entry.items():
                if key != "layers" and value is not None and key != "incomplete":
                    into[key] = max(value, into.get(key, value)) if key.startswith("peak") else value
    for entry in result["presets"].values():
        block_totals(entry, entry.get("finetune_epochs", 5))
    Path(out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["presets"], indent=1))


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
    parser.add_argument("--linears", default=",".join(LINEARS), help="comma-separated subset of the block's linears")
    parser.add_argument("--one-per-shape", action="store_true", help="time one linear per distinct shape")
    parser.add_argument("--skip-finetune", action="store_true")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="join partial result files into --out")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.merge:
        merge(args.merge, args.out)
        return
    chosen = args.linears.split(",")
    unknown = sorted(set(chosen) - set(LINEARS))
    if unknown:
        raise SystemExit(f"--linears: unknown {unknown}; the block's linears are {list(LINEARS)}")
    if args.one_per_shape:
        first_of_shape: dict[tuple[int, int], str] = {}
        for name in chosen:
            first_of_shape.setdefault(LINEARS[name], name)
        chosen = list(first_of_shape.values())

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
        for name in chosen:
            out_f, in_f = LINEARS[name]
            t = time.perf_counter()
            linear = block.get_submodule(name)
            new = quantize_aqlm(linear.weight.detach().float(), hessians[in_f], qcfg, None)
            torch.cuda.synchronize()
            parent, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent), child, new)
            layers[name] = {"seconds": time.perf_counter() - t, "shape": f"{out_f}x{in_f}"}
            print(f"[{preset}] {name} {out_f}x{in_f}: {layers[name]['seconds']:.1f} s", flush=True)
        quantize_peak = torch.cuda.max_memory_allocated() / 2**30
        entry = {"layers": layers, "peak_gpu_gb_quantize": quantize_peak, "config": qcfg.to_dict()}
        result["presets"][preset] = entry
        if not args.skip_finetune:
            # One fine-tuning epoch on random calibration activations (time scales linearly in epochs).
            # Linears not quantized in this call run as float layers (frozen, not trained).
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
            entry["finetune_seconds_per_epoch"] = time.perf_counter() - t
            entry["peak_gpu_gb_finetune"] = torch.cuda.max_memory_allocated() / 2**30
            del inputs, targets
        block_totals(entry, args.finetune_epochs)
        if "projected_hours_7b_32_blocks" in entry:
            print(
                f"[{preset}] block: quantize {entry['quantize_seconds_per_block']:.0f} s, "
                f"finetune {entry['finetune_seconds_per_epoch']:.0f} s/epoch, "
                f"projected 7B {entry['projected_hours_7b_32_blocks']:.2f} h",
                flush=True,
            )
        Path(args.out).write_text(json.dumps(result, indent=1))
        del block
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
