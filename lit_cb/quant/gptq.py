"""GPTQ (Frantar et al., 2022): scalar group-wise quantization with second-order error feedback.

Why it beats round-to-nearest: the layer objective is ``tr(ΔW H ΔWᵀ)`` with ``H = XᵀX / n``.
Quantizing the input columns one at a time and, after each, moving the remaining (not yet
quantized) columns by the optimal compensation ``-err_j · (H⁻¹)_{j,:} / (H⁻¹)_{jj}`` (OBS) removes
most of the error that correlated inputs would otherwise amplify. With ``U`` the upper Cholesky
factor of ``H⁻¹`` (``H⁻¹ = UᵀU``), the compensation for column ``j`` given that columns ``< j``
are already fixed is exactly row ``j`` of ``U`` divided by ``U_jj``, so one factorisation serves
the whole sweep.

Implementation notes (what makes it fast and correct):

* Lazy batch updates: inside a block of ``block_size`` columns the updates touch only that block;
  the accumulated errors are applied to the rest of the matrix with one matmul per block.
* Groups (non-static): a group's scale/zero are computed when its first column is reached, from
  the weights *including* all error feedback so far. Blocks are aligned to whole groups (the
  effective block is a multiple of ``group_size``) so the group's columns are fully up to date at
  that moment, which is what makes the blocked result identical to the column-at-a-time one.
* Act-order: columns are processed by descending ``diag(H)`` and permuted back afterwards. Groups
  are then contiguous in the *processing* order, so the layer keeps a ``g_idx`` map from input
  column to group. With ``static_groups`` the group parameters are instead fixed up front from
  the original weights in contiguous original-order groups, so no ``g_idx`` is needed (at a small
  accuracy cost).
* Dead inputs (``H_jj == 0``, never active in calibration) get ``H_jj = 1`` and weight 0.
* Dampening ``λ = damp · mean(diag H)`` is added to the diagonal; ``H`` is inverted in float64
  (cheap next to the column sweep, and robust for 11008-wide inputs); if the factorisation still
  fails, more dampening is added and a warning is issued.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from lit_cb.configs.dense import GPTQConfig  # noqa: F401 (re-exported: the config lives torch-free)
from lit_cb.quant.dense_quant import (
    GroupQuantLinear,
    dequantize_codes,
    group_params,
    quantize_to_codes,
    resolve_group_size,
    validate_bits_group,
)
from lit_cb.quant.registry import register_method


@dataclass
class GPTQResult:
    """Output of :func:`gptq_quantize` in original column order.

    ``codes`` int64 ``[out, in]``; ``scales``/``zeros`` ``[out, n_groups]`` (float16-exact values);
    ``g_idx`` int64 ``[in]`` group of each input column, or None when groups are contiguous.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor | None
    group_size: int

    def dequantize(self) -> torch.Tensor:
        if self.g_idx is not None:
            return dequantize_codes(
                self.codes.to(self.scales.dtype), self.scales[:, self.g_idx], self.zeros[:, self.g_idx]
            )
        out_f, in_f = self.codes.shape
        n_groups = self.scales.shape[1]
        codes = self.codes.to(self.scales.dtype).reshape(out_f, n_groups, in_f // n_groups)
        return dequantize_codes(codes, self.scales[..., None], self.zeros[..., None]).reshape(out_f, in_f)


def upper_cholesky_of_inverse(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """``U`` upper triangular with ``(H + λI)⁻¹ = UᵀU``, ``λ = damp · mean(diag H)``, in float64.

    Retries with ten times more dampening (up to 1e3 · mean(diag H)) when ``H`` is numerically not
    positive definite, rather than failing a multi-hour run on one layer."""
    h = hessian.to(torch.float64)
    mean_diag = float(torch.diagonal(h).mean())
    if not mean_diag > 0:
        raise ValueError("hessian has a non-positive mean diagonal; was it accumulated?")
    lam = damp * mean_diag
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(8):
        chol, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0:
            h_inv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(h_inv, upper=True)
            if int(info) == 0:
                if attempt:
                    warnings.warn(
                        f"GPTQ: hessian needed dampening {lam / mean_diag:.3g}·mean(diag H) (asked {damp})",
                        stacklevel=3,
                    )
                return upper
        lam = max(lam, 1e-6 * mean_diag) * 10
    raise RuntimeError("GPTQ: hessian is not positive definite even with heavy dampening")


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int = -1,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    static_groups: bool = False,
    symmetric: bool = False,
) -> GPTQResult:
    """Quantize ``weight`` ``[out, in]`` against ``hessian`` ``[in, in]`` with GPTQ.

    Works in float32 (float64 if ``weight`` is float64, for exact tests) on ``weight``'s device.
    """
    validate_bits_group(bits, group_size)
    if weight.ndim != 2 or tuple(hessian.shape) != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"weight {tuple(weight.shape)} and hessian {tuple(hessian.shape)} do not match")
    if not torch.isfinite(hessian).all():
        raise ValueError("hessian contains NaN or inf")
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    device = weight.device
    out_f, in_f = weight.shape
    gs = resolve_group_size(group_size, in_f)
    n_groups = in_f // gs
    # Dynamic groups: parameters computed during the sweep. A single whole-row group gives the same
    # parameters either way (nothing has been updated before column 0), so it takes the static path.
    dynamic = n_groups > 1 and not static_groups

    w = weight.detach().to(dtype).clone()
    h = hessian.detach().to(device=device, dtype=torch.float64).clone()
    dead = torch.diagonal(h) == 0
    torch.diagonal(h)[dead] = 1.0
    w[:, dead] = 0

    scales = torch.zeros(out_f, n_groups, dtype=dtype, device=device)
    zeros = torch.zeros(out_f, n_groups, dtype=dtype, device=device)
    if not dynamic:
        grouped = w.reshape(out_f * n_groups, gs)
        s, z = group_params(grouped, bits, symmetric)
        scales.copy_(s.reshape(out_f, n_groups))
        zeros.copy_(z.reshape(out_f, n_groups))

    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        w = w[:, perm]
        h = h[perm][:, perm]
    else:
        perm = torch.arange(in_f, device=device)
    upper = upper_cholesky_of_inverse(h, damp).to(dtype)
    del h

    # Group of each processed position: contiguous in processing order when dynamic, the original
    # column's group otherwise. Python ints so that the sweep never synchronises with the device.
    col_group = (torch.arange(in_f, device=device) // gs if dynamic else perm // gs).tolist()
    # Align blocks to whole groups so a group's columns are fully error-updated when it starts.
    block = max(block_size // gs, 1) * gs if dynamic else block_size

    codes = torch.empty(out_f, in_f, dtype=dtype, device=device)
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        w_blk = w[:, i1:i2]  # a view: updated in place
        u_blk = upper[i1:i2, i1:i2]
        err_blk = torch.empty(out_f, i2 - i1, dtype=dtype, device=device)
        for i in range(i2 - i1):
            p = i1 + i
            g = col_group[p]
            if dynamic and p % gs == 0:
                s, z = group_params(w_blk[:, i : i + gs], bits, symmetric)
                scales[:, g] = s
                zeros[:, g] = z
            s, z = scales[:, g], zeros[:, g]
            col = w_blk[:, i]
            q = quantize_to_codes(col, s, z, bits)
            codes[:, p] = q
            err = (col - dequantize_codes(q, s, z)) / u_blk[i, i]
            w_blk[:, i + 1 :] -= err[:, None] * u_blk[i, i + 1 :][None, :]
            err_blk[:, i] = err
        if i2 < in_f:
            w[:, i2:] -= err_blk @ upper[i1:i2, i2:]

    g_idx = None
    if act_order:
        inv = torch.argsort(perm)
        codes = codes[:, inv]
        if dynamic:
            g_idx = (torch.arange(in_f, device=device) // gs)[inv]
    return GPTQResult(codes.to(torch.int64), scales, zeros, g_idx, group_size)


@register_method(GPTQConfig, "gptq")
def quantize_gptq(
    weight: torch.Tensor, hessian: torch.Tensor, config: GPTQConfig, bias: torch.Tensor | None = None
) -> GroupQuantLinear:
    """Registry transform: GPTQ-quantize one linear layer into a :class:`GroupQuantLinear`."""
    res = gptq_quantize(
        weight.float(),
        hessian,
        bits=config.bits,
        group_size=config.group_size,
        damp=config.damp,
        act_order=config.act_order,
        block_size=config.block_size,
        static_groups=config.static_groups,
        symmetric=config.symmetric,
    )
    return GroupQuantLinear(
        res.codes, res.scales, res.zeros, config.bits, config.group_size, bias=bias, g_idx=res.g_idx
    )
