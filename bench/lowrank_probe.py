"""Would an activation-aware low-rank correction of the codebook error pay for its bits? (issue 14)

    python bench/lowrank_probe.py --out bench/results/cpu_lowrank_probe.json     # ~4 minutes on 2 CPU cores

Rank-2 LoRA on every compressed linear was the best recovery variant inside issue 14's 2.16 bits
(46.11 against 50.69, ``recovery_variants_h200.json``), and it starts from zero. EoRA/QERA-style
compensation would start it from the best rank-r fit of the quantization error instead: with
``H = XᵀX`` (damped) ``= L Lᵀ``, the rank-r ``C`` that minimises ``||X (ΔW - C)ᵀ||²`` is the truncated SVD
of ``ΔW L`` mapped back by ``L⁻¹`` (Eckart-Young in the H norm), and the share of the layer's output
error left is ``sum_{i>r} σᵢ² / sum σᵢ²`` for the singular values σ of ``ΔW L``. This script measures
that share on real SmolLM2-135M layers: the embedded model, H from ``--windows`` C4 windows of
``--seqlen`` tokens (concat sampling) of the float model, each linear compressed with the committed
codebook method (g4 B8, GPTVQ weighting) against its own H; plus the plain SVD of ``ΔW`` (LoftQ-style,
no activations) judged in the same H norm. Float64 throughout; no GPU needed, the figures are the same
on any device. Every row also gives the correction's cost in bits per weight (fp16 factors).

A still cheaper correction is a bias: with ``μ`` the mean input, ``E||x ΔWᵀ||² = ||μ ΔWᵀ||² + tr(ΔW Σ
ΔWᵀ)``, and a bias of ``-μ ΔWᵀ`` (``out`` fp16 values, ``16 / in`` bits per weight) removes the first
term exactly (bias correction, Nagel et al. 2019). ``mean_shift_share`` is that term's share of the error.
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

RANKS = (1, 2, 4, 8, 16, 32)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")


def error_left(dw: torch.Tensor, hessian: torch.Tensor, ranks=RANKS, damp: float = 0.01) -> dict:
    """Share of ``tr(ΔW H ΔWᵀ)`` left after the best rank-r correction in the H norm, for each r, and after
    the plain rank-r SVD of ``ΔW`` (judged in the H norm); float64."""
    from lit_cb.quant.objective import damped_hessian

    dw = dw.double()
    chol = torch.linalg.cholesky(damped_hessian(hessian.double(), damp))
    sv = torch.linalg.svdvals(dw @ chol)
    total = float((sv**2).sum())
    u, s, vh = torch.linalg.svd(dw, full_matrices=False)
    row = {"weighted": {}, "plain_svd": {}}
    for r in ranks:
        row["weighted"][r] = float((sv[r:] ** 2).sum()) / total
        plain = dw - (u[:, :r] * s[:r]) @ vh[:r]
        row["plain_svd"][r] = float(((plain @ chol) ** 2).sum()) / total
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", default="0,14,28", help="comma-separated block indices")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--kmeans-iters", type=int, default=10)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()

    from lit_cb.configs.codebook import CodebookConfig
    from lit_cb.data.datamodule import load_documents, sample_concat_windows
    from lit_cb.environment import run_environment
    from lit_cb.models import decoder_layers, load_model
    from lit_cb.quant.codebook import codebook_quantize_tensors
    from lit_cb.quant.objective import damped_hessian

    torch.manual_seed(0)
    model, tok = load_model("smollm2", "float32", "cpu")
    docs = [tok(d).input_ids for d in load_documents("c4")]
    windows = sample_concat_windows(docs, args.windows, args.seqlen, 0, tok.eos_token_id)
    layers = decoder_layers(model)
    sums: dict[str, list] = {}
    hooks = []
    for b in (int(x) for x in args.blocks.split(",")):
        for name in LINEARS:
            linear = layers[b].get_submodule(name)
            key = f"{b}.{name}"
            n = linear.in_features
            sums[key] = [torch.zeros(n, n, dtype=torch.float64), 0, torch.zeros(n, dtype=torch.float64)]

            def hook(module, inputs, output, key=key):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
                sums[key][0] += x.T @ x
                sums[key][1] += x.shape[0]
                sums[key][2] += x.sum(0)

            hooks.append(linear.register_forward_hook(hook))
    with torch.no_grad():
        for w in windows:
            model(w[None])
    for h in hooks:
        h.remove()

    cfg = CodebookConfig(in_group_size=4, nbits=8, weighting="gptvq", kmeans_iters=args.kmeans_iters)
    doc = {
        "what": "share of each layer's output error tr(dW H dW^T) left after a rank-r correction "
        "(activation-aware: truncated SVD of dW L, H = L L^T; plain: truncated SVD of dW), and the share "
        "that is the mean shift ||mu dW^T||^2 (what a bias of -mu dW^T would remove)",
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "environment": run_environment(torch.device("cpu")),
        "model": "smollm2 (SmolLM2-135M-Instruct, embedded)",
        "calibration": f"{args.windows} C4 windows of {args.seqlen} tokens (concat), float model inputs",
        "method": cfg.__dict__ | {"note": "each linear against its own H, not sequentially"},
        "rows": [],
    }
    for key, (total, count, first) in sums.items():
        block, name = key.split(".", 1)
        weight = layers[int(block)].get_submodule(name).weight.detach().float()
        hessian = total / count
        t0 = time.time()
        res = codebook_quantize_tensors(weight, hessian.float(), cfg)
        w_hat = (res.codebook[res.codes] * res.scales[:, None, None]).reshape(weight.shape)
        dw = weight.double() - w_hat.double()
        chol = torch.linalg.cholesky(damped_hessian(hessian, cfg.damp))
        rel = float(((dw @ chol) ** 2).sum() / ((weight.double() @ chol) ** 2).sum())
        # E||x dWᵀ||² = ||μ dWᵀ||² + tr(dW Σ dWᵀ): a bias of -μ dWᵀ removes the first term exactly
        mean_shift = float(((first / count) @ dw.T).square().sum() / torch.trace(dw @ hessian @ dw.T))
        out_f, in_f = weight.shape
        row = {
            "layer": key,
            "shape": [out_f, in_f],
            "relative_error": rel,
            "mean_shift_share": mean_shift,
            "error_left": error_left(dw, hessian, damp=cfg.damp),
            "bits_per_weight": {r: 16 * r * (in_f + out_f) / (in_f * out_f) for r in RANKS},
            "seconds": time.time() - t0,
        }
        doc["rows"].append(row)
        left = row["error_left"]["weighted"][2]
        print(f"{key}: rank-2 leaves {left:.3f} of the error; the mean shift is {mean_shift:.3f} of it", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
