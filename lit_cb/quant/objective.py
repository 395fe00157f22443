"""The layer objective every Hessian-aware method minimises, and the dampening they share.

With H = XᵀX / n, ``tr(ΔW H ΔWᵀ) = ||XWᵀ - XŴᵀ||² / n``: the output error of the layer on the
calibration data, without keeping X.
"""

from __future__ import annotations

import torch


def damped_hessian(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """``H + damp * mean(diag H) * I``, symmetrised (accumulated sums drift slightly off); dead
    inputs (zero diagonal) get a unit diagonal, as in GPTQ, so H stays invertible."""
    h = ((hessian + hessian.T) / 2).to(torch.promote_types(hessian.dtype, torch.float32))
    diag = h.diagonal()
    diag[diag <= 0] = 1.0
    if damp > 0:
        diag += damp * diag.mean()
    return h


def layer_error(weight: torch.Tensor, weight_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(ΔW H ΔWᵀ)``, i.e. ``||X Wᵀ - X Ŵᵀ||² / n`` when ``H = XᵀX / n`` (computed in >= fp32)."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    with torch.no_grad():
        delta = weight.to(dtype) - weight_hat.to(device=weight.device, dtype=dtype)  # [out, in]
        h = hessian.to(device=weight.device, dtype=dtype)  # [in, in]
        return float(((delta @ h) * delta).sum())


def fisher_layer_error(
    weight: torch.Tensor, weight_hat: torch.Tensor, hessian: torch.Tensor, output_fisher: torch.Tensor
) -> float:
    """``sum_o F_o (ΔW H ΔWᵀ)_oo``: each output's squared error weighted by the empirical Fisher ``F_o`` of the
    loss with respect to that output (per token). With ``H = XᵀX / n`` this is twice the second-order estimate
    of the per-token loss increase, under the Fisher's usual diagonal approximation (float64)."""
    with torch.no_grad():
        delta = weight.double() - weight_hat.to(device=weight.device).double()
        per_row = ((delta @ hessian.to(device=weight.device).double()) * delta).sum(1)
        return float((per_row * output_fisher.to(device=weight.device).double()).sum())


def relative_layer_error(weight: torch.Tensor, weight_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """:func:`layer_error` divided by ``tr(W H Wᵀ)`` (the output energy): 0 is perfect, 1 is Ŵ = 0."""
    ref = layer_error(weight, torch.zeros_like(weight), hessian)
    return layer_error(weight, weight_hat, hessian) / max(ref, 1e-30)
