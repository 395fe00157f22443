"""Would rotating the weights before clustering (QuIP#/QuaRot-style incoherence) lower the codebook error? (issue 14)

    python bench/rotation_probe.py --out bench/results/cpu_rotation_probe.json     # ~20 minutes on 2 CPU cores

The codebook method clusters groups of 4 consecutive input weights of each row. Outlier columns and
rows make those groups hard to cluster at 8 bits per group; an orthogonal rotation spreads them out
(the weights become nearly Gaussian), and it costs nothing at inference where it can be folded away:

- **input side** ``W -> W Q`` with ``x -> x Q``: free for q/k/v and gate/up when the residual stream is
  rotated (QuaRot/SliceGPT's computational invariance: the RMSNorm scale folded into those linears first,
  the embedding rotated, the head un-rotated), for o_proj per head when v_proj's output is rotated to
  match; down_proj's input would need an online Hadamard transform.
- **output side** ``W -> Qᵀ W``: free for o_proj and down_proj under the same residual-stream rotation.

The output error of a layer is unchanged by these maps (``x Q (W Q)ᵀ = x Wᵀ``; ``tr(ΔW H ΔWᵀ)`` is
invariant under an orthogonal map of the rows), so each variant is judged by the same number: the share
``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` of the layer's output energy that clustering loses, with ``H`` the layer's
own input second moment from ``--windows`` C4 windows of the float model, the rotated variant quantized
against ``Qᵀ H Q``. Rotations are Haar-random orthogonal matrices (``--rotation-seeds``, so each layer's
ratio comes with its spread over rotations); the codebook method is the committed one (g4 B8, GPTVQ
weighting, one codebook per layer, per-row scales). Float64 error accounting; no GPU needed: the figures
hold on any device.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

LINEARS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
VARIANTS = ("input", "output", "both")


def haar_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A Haar-random ``n x n`` orthogonal matrix (float64): QR of a Gaussian matrix, signs fixed by R's diagonal."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def rotate(weight: torch.Tensor, hessian: torch.Tensor, q_in, q_out) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q_outᵀ W Q_in, Q_inᵀ H Q_in)``: the layer as its rotated copy computes it (None: that side as is)."""
    w, h = weight.double(), hessian.double()
    if q_in is not None:
        w, h = w @ q_in, q_in.T @ h @ q_in
    if q_out is not None:
        w = q_out.T @ w
    return w, h


def relative_error(weight: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` in float64 (invariant under the rotations above)."""
    w, h = weight.double(), hessian.double()
    dw = w - w_hat.double()
    return float(torch.einsum("oi,ij,oj->", dw, h, dw) / torch.einsum("oi,ij,oj->", w, h, w))


def quantize(weight: torch.Tensor, hessian: torch.Tensor, config) -> torch.Tensor:
    """The codebook method's dequantized weight for ``weight`` clustered against ``hessian``."""
    from lit_cb.quant.codebook import codebook_quantize_tensors

    res = codebook_quantize_tensors(weight.float(), hessian.float(), config)
    return (res.codebook[res.codes] * res.scales[:, None, None]).reshape(weight.shape)


def probe_layer(weight: torch.Tensor, hessian: torch.Tensor, config, seeds: list[int]) -> dict:
    """The plain layer's error and, per variant, each rotation's error and its ratio to the plain one."""
    base = relative_error(weight, quantize(weight, hessian, config), hessian)
    out_f, in_f = weight.shape
    row: dict = {"relative_error": base, "variants": {}}
    for variant in VARIANTS:
        errs = []
        for seed in seeds:
            q_in = haar_orthogonal(in_f, seed) if variant in ("input", "both") else None
            q_out = haar_orthogonal(out_f, 1000 + seed) if variant in ("output", "both") else None
            w, h = rotate(weight, hessian, q_in, q_out)
            errs.append(relative_error(w, quantize(w, h, config), h))
        ratios = [e / base for e in errs]
        row["variants"][variant] = {"relative_error": errs, "ratio": ratios, "ratio_mean": statistics.fmean(ratios)}
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", default="0,14,28", help="comma-separated block indices")
    p.add_argument("--linears", default=",".join(LINEARS))
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--kmeans-iters", type=int, default=10)
    p.add_argument("--rotation-seeds", default="0,1", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()

    from lit_cb.configs.codebook import CodebookConfig
    from lit_cb.data.datamodule import load_documents, sample_concat_windows
    from lit_cb.environment import run_environment
    from lit_cb.hessian import attach_hessian_hooks, remove_hooks
    from lit_cb.models import decoder_layers, load_model

    torch.manual_seed(0)
    model, tok = load_model("smollm2", "float32", "cpu")
    docs = [tok(d).input_ids for d in load_documents("c4")]
    windows = sample_concat_windows(docs, args.windows, args.seqlen, 0, tok.eos_token_id)
    layers = decoder_layers(model)
    modules = {
        f"{b}.{name}": layers[b].get_submodule(name)
        for b in (int(x) for x in args.blocks.split(","))
        for name in args.linears.split(",")
    }
    accumulators, handles = attach_hessian_hooks(modules, dtype=torch.float64)
    with torch.no_grad():
        for w in windows:
            model(w[None])
    remove_hooks(handles)

    cfg = CodebookConfig(in_group_size=4, nbits=8, weighting="gptvq", kmeans_iters=args.kmeans_iters)
    doc = {
        "what": "share of each layer's output energy tr(dW H dW^T) / tr(W H W^T) lost to the codebook method, "
        "plain and with Haar-random orthogonal rotations of the input side, the output side or both "
        "(ratio: rotated / plain; < 1 means the rotation helps)",
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "environment": run_environment(torch.device("cpu")),
        "model": "smollm2 (SmolLM2-135M-Instruct, embedded)",
        "calibration": f"{args.windows} C4 windows of {args.seqlen} tokens (concat), float model inputs",
        "method": cfg.__dict__ | {"note": "each linear against its own H, not sequentially"},
        "rotation_seeds": args.rotation_seeds,
        "rows": [],
    }
    for key, module in modules.items():
        t0 = time.time()
        acc = accumulators[key]
        hessian = acc.sum / acc.num_tokens  # float64 (the .hessian property rounds to float32)
        row = probe_layer(module.weight.detach(), hessian, cfg, args.rotation_seeds)
        row |= {"layer": key, "shape": list(module.weight.shape), "seconds": time.time() - t0}
        doc["rows"].append(row)
        ratios = ", ".join(f"{v} {row['variants'][v]['ratio_mean']:.3f}" for v in VARIANTS)
        print(f"{key}: error {row['relative_error']:.4f}; rotated / plain: {ratios}", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1))
    doc["summary"] = {
        v: {
            "ratio_mean_over_layers": statistics.fmean(r["variants"][v]["ratio_mean"] for r in doc["rows"]),
            "ratio_min": min(min(r["variants"][v]["ratio"]) for r in doc["rows"]),
            "ratio_max": max(max(r["variants"][v]["ratio"]) for r in doc["rows"]),
        }
        for v in VARIANTS
    }
    args.out.write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc["summary"], indent=1))


if __name__ == "__main__":
    main()
