"""Would one codebook shared by every layer, with 8-dimensional codewords and 2^16 of them, beat one small
codebook per layer at the same bits? (issue 14; issue 10's "computed codes" question too)

    python bench/shared_codebook_probe.py --out bench/results/cpu_shared_codebook_probe.json   # ~25 min, 2 CPU cores

Why ask: at 2 bits per weight a per-layer codebook must stay small to be cheap. The committed format
(g4 B8: 256 codewords of 4 weights per layer, 2.056 bits) pays 16 kbit per layer for its codebook; a
g8 B16 codebook (65,536 codewords of 8 weights, AQLM's best 2-bit shape) would cost 8.4 Mbit, 25 bits
per weight of a 576x576 layer. Shared by all 210 compressed linears of SmolLM2-135M it costs 0.079 bits
per weight: g8 B16 then counts about 2.10 bits (g8 B15, 32,768 codewords, about 1.94). Eight dimensions
and 2^16 entries fill space far better than four dimensions and 2^8 entries (the vector-quantization gain
QuIP#'s E8 lattice codebook and AQLM's 1x16 g8 are built on), but one codebook must now fit the
row-normalised weights of every layer. Only a measurement says which effect wins.

What it measures, per probe layer (blocks ``--blocks`` x ``--linears``): the share of the layer's output
energy ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` lost, H the layer's input second moment from ``--windows`` C4
windows of the float model (float64 accounting, so the figures hold on any device), for
- ``per_layer_g4b8``: the committed codebook method (g4 B8, GPTVQ, one codebook per layer);
- ``shared_g8bB``: the layer's row-normalised weights assigned with the same GPTVQ error feedback
  (``lit_cb.quant.codebook.gptvq_assign``) to a codebook shared by all layers, trained once by
  weighted k-means on a ``--pool`` subsample of every compressed linear's 8-weight groups (weights:
  each layer's own GPTQ saliency ``1/U_jj²`` and row scale², divided by their layer mean so every layer
  counts alike, as the per-layer method's relative error does).
Bits are counted as ``bits_per_weight`` counts them: codes + fp16 row scales + the codebook, the shared
one spread over all compressed weights.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

LINEARS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")


def relative_error(weight: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` in float64 (lit_cb's own measure, on float64 copies)."""
    from lit_cb.quant.objective import relative_layer_error

    return relative_layer_error(weight.double(), w_hat.double(), hessian.double())


def pool_vectors(
    weights: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor], g: int, size: int, damp: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` row-normalised g-weight groups drawn from all layers in proportion to their weights, with
    k-means weights (GPTQ saliency x row scale², each divided by its layer mean)."""
    from lit_cb.quant.codebook import inverse_hessian_cholesky, row_scales
    from lit_cb.quant.objective import damped_hessian

    total = sum(w.numel() for w in weights.values())
    gen = torch.Generator().manual_seed(seed)
    xs, ws = [], []
    for name, weight in weights.items():
        w = weight.float()
        scales = row_scales(w, "row_norm")
        u = inverse_hessian_cholesky(damped_hessian(hessians[name].float(), damp))
        col_w = u.diagonal().square().reciprocal()
        vw = scales.square()[:, None] * col_w[None, :]
        vw = vw / vw.mean()  # every layer counts alike, as each layer's relative error does
        x = (w / scales[:, None]).reshape(-1, g)
        vw = vw.reshape(-1, g)
        take = max(1, round(size * weight.numel() / total))
        idx = torch.randperm(x.shape[0], generator=gen)[:take]
        xs.append(x[idx])
        ws.append(vw[idx])
    return torch.cat(xs), torch.cat(ws)


def shared_assign(weight: torch.Tensor, hessian: torch.Tensor, codebook: torch.Tensor, damp: float) -> torch.Tensor:
    """The dequantized weight: row scales, GPTVQ error-feedback assignment to the fixed shared codebook."""
    from lit_cb.quant.codebook import gptvq_assign, inverse_hessian_cholesky, row_scales
    from lit_cb.quant.objective import damped_hessian

    w = weight.float()
    scales = row_scales(w, "row_norm")
    u = inverse_hessian_cholesky(damped_hessian(hessian.float(), damp))
    codes = gptvq_assign(w / scales[:, None], codebook, u, 128)
    return (codebook[codes] * scales[:, None, None]).reshape(w.shape)


def per_layer(weight: torch.Tensor, hessian: torch.Tensor, config) -> torch.Tensor:
    from lit_cb.quant.codebook import codebook_quantize_tensors

    res = codebook_quantize_tensors(weight.float(), hessian.float(), config)
    return (res.codebook[res.codes] * res.scales[:, None, None]).reshape(weight.shape)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", default="0,14,28", help="probe blocks (comma-separated)")
    p.add_argument("--linears", default=",".join(LINEARS))
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--kmeans-iters", type=int, default=10, help="per-layer g4 B8 k-means iterations")
    p.add_argument("--shared-bits", default="16,15", help="codebook bits B of the shared g8 codebooks")
    p.add_argument("--shared-iters", type=int, default=8, help="k-means iterations of each shared codebook")
    p.add_argument("--pool", type=int, default=1 << 21, help="8-weight groups the shared codebooks are fit on")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()

    from lit_cb.architectures import DEFAULT_TARGETS
    from lit_cb.configs.codebook import CodebookConfig
    from lit_cb.data.datamodule import load_documents, sample_concat_windows
    from lit_cb.environment import run_environment
    from lit_cb.hessian import attach_hessian_hooks, remove_hooks
    from lit_cb.models import load_model
    from lit_cb.quant.codebook import weighted_kmeans

    torch.manual_seed(0)
    t_start = time.time()
    model, tok = load_model("smollm2", "float32", "cpu")
    docs = [tok(d).input_ids for d in load_documents("c4")]
    windows = sample_concat_windows(docs, args.windows, args.seqlen, 0, tok.eos_token_id)
    modules = {
        n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and re.search(DEFAULT_TARGETS, n)
    }
    accumulators, handles = attach_hessian_hooks(modules, dtype=torch.float64)
    with torch.no_grad():
        for w in windows:
            model(w[None])
    remove_hooks(handles)
    hessians = {n: accumulators[n].sum / accumulators[n].num_tokens for n in modules}
    weights = {n: m.weight.detach() for n, m in modules.items()}
    total_weights = sum(w.numel() for w in weights.values())
    cfg = CodebookConfig(in_group_size=4, nbits=8, weighting="gptvq", kmeans_iters=args.kmeans_iters)
    print(
        f"{len(modules)} compressed linears, {total_weights} weights; H from {args.windows} x {args.seqlen}", flush=True
    )

    g = 8
    x, vw = pool_vectors(weights, hessians, g, args.pool, cfg.damp, seed=0)
    shared: dict[int, dict] = {}
    for b in (int(s) for s in args.shared_bits.split(",")):
        t0 = time.time()
        km = weighted_kmeans(x, vw, 1 << b, iters=args.shared_iters, init="random", seed=0)
        codebook = km.centroids.half().float()
        shared[b] = {
            "codebook": codebook,
            "seconds": time.time() - t0,
            "history": km.history,
            "codebook_bits_per_weight": (1 << b) * g * 16 / total_weights,
        }
        print(
            f"shared g8 B{b}: fit in {shared[b]['seconds']:.0f} s, "
            f"objective {km.history[0]:.4g} -> {km.history[-1]:.4g}",
            flush=True,
        )

    doc = {
        "what": "share of each layer's output energy tr(dW H dW^T) / tr(W H W^T) lost, per-layer g4 B8 codebooks "
        "(committed method) vs one g8 codebook shared by all compressed linears (GPTVQ assignment to it)",
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "environment": run_environment(torch.device("cpu")),
        "model": "smollm2 (SmolLM2-135M-Instruct, embedded)",
        "calibration": f"{args.windows} C4 windows of {args.seqlen} tokens (concat), float model inputs",
        "per_layer_method": cfg.__dict__ | {"note": "each linear against its own H, not sequentially"},
        "shared": {
            f"g8B{b}": {k: v for k, v in s.items() if k != "codebook"} | {"pool_vectors": int(x.shape[0])}
            for b, s in shared.items()
        },
        "rows": [],
    }
    probe = [f"model.layers.{b}.{n}" for b in args.blocks.split(",") for n in args.linears.split(",")]
    for name in probe:
        t0 = time.time()
        weight, h = weights[name], hessians[name]
        out_f, in_f = weight.shape
        row = {"layer": name, "shape": [out_f, in_f], "errors": {}, "bits_per_weight": {}}
        row["errors"]["per_layer_g4b8"] = relative_error(weight, per_layer(weight, h, cfg), h)
        row["bits_per_weight"]["per_layer_g4b8"] = 8 / 4 + 16 / in_f + 256 * 4 * 16 / (out_f * in_f)
        for b, s in shared.items():
            key = f"shared_g8b{b}"
            row["errors"][key] = relative_error(weight, shared_assign(weight, h, s["codebook"], cfg.damp), h)
            row["bits_per_weight"][key] = b / g + 16 / in_f + s["codebook_bits_per_weight"]
        row["seconds"] = time.time() - t0
        doc["rows"].append(row)
        base = row["errors"]["per_layer_g4b8"]
        ratios = ", ".join(f"{k} {v / base:.3f}" for k, v in row["errors"].items() if k != "per_layer_g4b8")
        print(f"{name}: g4B8 error {base:.4f}; shared / per-layer: {ratios}", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1))
    keys = list(doc["rows"][0]["errors"])
    doc["summary"] = {
        k: {
            "ratio_to_per_layer_mean": statistics.fmean(
                r["errors"][k] / r["errors"]["per_layer_g4b8"] for r in doc["rows"]
            ),
            "ratio_min": min(r["errors"][k] / r["errors"]["per_layer_g4b8"] for r in doc["rows"]),
            "ratio_max": max(r["errors"][k] / r["errors"]["per_layer_g4b8"] for r in doc["rows"]),
            "geomean_ratio": math.exp(
                statistics.fmean(math.log(r["errors"][k] / r["errors"]["per_layer_g4b8"]) for r in doc["rows"])
            ),
            "bits_per_weight_mean": statistics.fmean(r["bits_per_weight"][k] for r in doc["rows"]),
        }
        for k in keys
    }
    doc["seconds"] = time.time() - t_start
    args.out.write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc["summary"], indent=1))


if __name__ == "__main__":
    main()
