"""Discrete code updates of a :class:`~lit_cb.layers.CodebookLinear` (the V-step of PV-tuning), as
pure tensor math: no Lightning, no hooks (those live in :mod:`lit_cb.code_update_callback`).

Recovery trains the continuous parameters (codebooks, scales, norms, adapters); the codes are
discrete, so they get no gradient step. PV-tuning (Malinovskii et al., 2024) updates them with a
*linearized V-step*: take the gradient ``G`` of the training loss with respect to the dense weight
``Ŵ``, form a target ``W* = Ŵ - η D⁻¹ G`` and re-assign codes so that ``Ŵ_new`` is as close to
``W*`` as the codebooks allow, measured in the metric ``D``. With ``D = diag(d)``,
``d_i = E[x_i²]`` (the diagonal of the layer's input second moment), this projection is exactly
the minimiser over the codes of the quadratic model
``<G, W - Ŵ> + 1/(2η) ||(W - Ŵ) D^{1/2}||²`` of the loss, i.e. a projected diagonal
Gauss-Newton step. It is separable over weight groups, so each group is solved on its own:

    minimise over codes c_1..c_M of group (o, i):  sum_{r, j} d_j (W*_{r j} - s_o sum_m C_m[c_m]_{r j})²

by coordinate descent over the M codebooks (exact argmin over one codebook's 2^B entries with
the others fixed), chunked over groups so that the ``[chunk, 2^B]`` score block stays bounded
(a 7B ``11008 x 4096`` layer with B=16 never builds ``[groups, 65536, g]``). A group's codes
change only where its objective, evaluated directly, strictly decreases, so a step can never
increase the objective (the ``|c|² - 2 x·c`` expansion used for the search loses a few ulps; the
guard makes the step monotone as actually evaluated).

Step size (scale-free): the loss scale (AMP's grad scaler, the distillation temperature, the
number of ranks summed) must not change what happens, so ``η`` is not a learning rate but is
chosen per layer so that the D-weighted RMS of the update over the selected groups is ``step``
times the D-weighted RMS of the layer's weight. Only the ``fraction`` of groups whose target moved
most (largest D-weighted change) are re-assigned: PV-tuning's subspace selection, which keeps each
V-step small and cheap.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from lit_cb.layers import dequantize_weight
from lit_cb.quant.codebook import _exact_fp32_matmul

MAX_CHUNK_ELEMENTS = 1 << 24  # elements of one [chunk, 2^B] score block (64 MiB in fp32)
DAMP = 0.01
"""``d + DAMP * mean(d)``: dead input columns (d = 0) get a small positive weight, as GPTQ damps
its Hessian, so ``D⁻¹ G`` stays finite and the metric stays positive definite."""


@dataclass
class CodeUpdateStats:
    """What one discrete step did on one layer (or, summed, on a model)."""

    groups: int = 0
    """Groups re-assigned (selected)."""
    groups_changed: int = 0
    """Groups whose codes changed."""
    codes_changed: int = 0
    """Individual codes (group, codebook) that changed."""
    objective_before: float = 0.0
    """The selected groups' objective with the old codes."""
    objective_after: float = 0.0
    """The same with the new codes (<= objective_before, always)."""

    def __add__(self, other: CodeUpdateStats) -> CodeUpdateStats:
        return CodeUpdateStats(**{k: v + getattr(other, k) for k, v in asdict(self).items()})

    def to_dict(self) -> dict:
        return asdict(self)


def weight_groups(weight: torch.Tensor, out_group_size: int, in_group_size: int) -> torch.Tensor:
    """``[out, in]`` -> ``[num_out_groups, num_in_groups, out_group_size, in_group_size]`` (a view)."""
    out_features, in_features = weight.shape
    o, i = out_features // out_group_size, in_features // in_group_size
    return weight.view(o, out_group_size, i, in_group_size).permute(0, 2, 1, 3)


def _reconstruct(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """``sum_m codebooks[m, codes[:, m]]``: codes ``[N, M]`` int64 -> ``[N, og, g]`` (unscaled)."""
    out = codebooks[0][codes[:, 0]]
    for m in range(1, codebooks.shape[0]):
        out = out + codebooks[m][codes[:, m]]
    return out


def _objective(target: torch.Tensor, weights: torch.Tensor, scales: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Per-group ``sum_{r,j} w_j (T_rj - s recon_rj)²``; target/recon ``[N, og, g]``, weights
    ``[N, g]``, scales ``[N]`` -> ``[N]``."""
    diff = target - scales.view(-1, 1, 1) * recon
    return (diff.square() * weights.unsqueeze(1)).sum((-1, -2))


def assign_codes(
    target: torch.Tensor,
    weights: torch.Tensor,
    scales: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    sweeps: int = 1,
    max_chunk_elements: int = MAX_CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Re-assign the codes of ``N`` groups by guarded coordinate descent over the codebooks.

    ``target [N, og, g]``, ``weights [N, g]`` (> 0, per input column of each group), ``scales
    [N]``, ``codes [N, M]`` int64 (the start), ``codebooks [M, K, og, g]``. Computes in the
    promotion of the inputs' dtype with float32 (float64 stays float64). Returns ``(new codes
    [N, M], objective before [N], objective after [N])``; after <= before for every group.

    For codebook ``m``, with residual ``R = T - s * sum_{m' != m} C_m'[c_m']``,
    ``sum w (R - s C_k)² = const + s² (w · C_k²) - 2 s ((w R) · C_k)``: two ``[chunk, og*g] x
    [og*g, K]`` matmuls and an argmin per chunk. With M = 1 one sweep is the exact argmin.
    """
    if sweeps < 1:
        raise ValueError(f"sweeps={sweeps} must be >= 1")
    dtype = torch.promote_types(target.dtype, torch.float32)
    num_codebooks, num_codewords, og, g = codebooks.shape
    target = target.to(dtype)
    weights = weights.to(dtype)
    scales = scales.to(dtype)
    books = codebooks.to(dtype)
    codes = codes.clone()
    n = codes.shape[0]
    recon = _reconstruct(codes, books)
    obj = _objective(target, weights, scales, recon)
    before = obj.clone()
    if n == 0:
        return codes, before, obj
    if num_codebooks == 1:
        sweeps = 1  # the first sweep is already the exact argmin; more would repeat it
    chunk = max(1, max_chunk_elements // num_codewords)
    flat_books = books.reshape(num_codebooks, num_codewords, og * g)
    sq_books = flat_books.square()
    w_rows = weights.unsqueeze(1).expand(n, og, g).reshape(n, og * g)  # [N, og*g]
    with _exact_fp32_matmul():
        for _ in range(sweeps):
            for m in range(num_codebooks):
                partial = recon - books[m][codes[:, m]]  # [N, og, g]
                resid = (target - scales.view(-1, 1, 1) * partial).reshape(n, og * g)
                best = torch.empty(n, dtype=torch.int64, device=codes.device)
                for start in range(0, n, chunk):
                    rows = slice(start, start + chunk)
                    s = scales[rows, None]
                    scores = (w_rows[rows] @ sq_books[m].T).mul_(s * s)  # [chunk, K]
                    scores -= 2.0 * s * ((w_rows[rows] * resid[rows]) @ flat_books[m].T)
                    best[rows] = scores.argmin(dim=1)
                cand_recon = partial + books[m][best]
                cand_obj = _objective(target, weights, scales, cand_recon)
                better = cand_obj < obj
                codes[:, m] = torch.where(better, best, codes[:, m])
                recon = torch.where(better.view(-1, 1, 1), cand_recon, recon)
                obj = torch.where(better, cand_obj, obj)
    return codes, before, obj


def update_codes(
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    target: torch.Tensor,
    column_weights: torch.Tensor,
    groups: torch.Tensor | None = None,
    sweeps: int = 1,
    max_chunk_elements: int = MAX_CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, CodeUpdateStats]:
    """Step 1 on a whole layer: re-assign the codes of ``groups`` to approach ``target``.

    ``codes [O, I, M]`` int64, ``codebooks [M, K, og, g]``, ``scales`` ``[O]`` (or ``[O, 1, 1, 1]``),
    ``target [out, in]`` (the dense W*), ``column_weights [in]`` (> 0: d), ``groups``: flat group
    indices ``o * I + i`` (``None``: all). Returns new int64 codes ``[O, I, M]`` (unchanged outside
    ``groups``) and the step's statistics.
    """
    num_out, num_in, num_codebooks = codes.shape
    _, _, og, g = codebooks.shape
    flat_codes = codes.reshape(num_out * num_in, num_codebooks)
    if groups is None:
        groups = torch.arange(num_out * num_in, device=codes.device)
    t = weight_groups(target, og, g).reshape(num_out * num_in, og, g)[groups]
    w = column_weights.view(1, num_in, g).expand(num_out, num_in, g).reshape(-1, g)[groups]
    s = scales.reshape(num_out, 1).expand(num_out, num_in).reshape(-1)[groups]
    old = flat_codes[groups]
    new, before, after = assign_codes(t, w, s, old, codebooks, sweeps, max_chunk_elements)
    out = flat_codes.clone()
    out[groups] = new
    differs = new != old  # [N, M]
    stats = CodeUpdateStats(
        groups=int(groups.numel()),
        groups_changed=int(differs.any(dim=1).sum()),
        codes_changed=int(differs.sum()),
        objective_before=float(before.double().sum()),
        objective_after=float(after.double().sum()),
    )
    return out.view(num_out, num_in, num_codebooks), stats


def damped_column_weights(sq_mean: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """``d + damp * mean(d)`` (all-zero d -> all ones), the metric of the V-step."""
    d = sq_mean.clamp_min(0)
    mean = float(d.mean()) if d.numel() else 0.0
    if not mean > 0:
        return torch.ones_like(d)
    return d + damp * mean


def linearized_target(
    weight: torch.Tensor,
    grad: torch.Tensor,
    column_weights: torch.Tensor,
    fraction: float,
    step: float,
    out_group_size: int,
    in_group_size: int,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The V-step's target and the groups it re-assigns.

    ``weight`` Ŵ and ``grad`` G ``[out, in]``, ``column_weights`` d ``[in]`` (> 0). The direction is
    ``-G / d`` (the minimiser of the quadratic model in the D metric); the selected groups are the
    ``ceil(fraction * groups)`` with the largest D-weighted change (ties: lower index first, a
    stable sort, so every rank selects the same); ``η`` makes the D-weighted RMS of the update over
    them ``step`` times the D-weighted RMS of Ŵ over the layer. Returns ``(W* [out, in], selected
    flat group indices)``, or None when G is zero or not finite (an AMP overflow step): no update.
    """
    if not bool(torch.isfinite(grad).all()):
        return None
    w = weight.float()
    d = column_weights.float().view(1, -1)
    direction = -grad.float() / d  # [out, in]
    per_group = weight_groups(direction.square() * d, out_group_size, in_group_size).sum((-1, -2)).reshape(-1)
    num_groups = per_group.numel()
    k = min(num_groups, max(1, math.ceil(fraction * num_groups)))
    order = torch.sort(per_group, descending=True, stable=True).indices
    selected = order[:k]
    d_group = weight_groups(d.expand_as(w), out_group_size, in_group_size).sum((-1, -2)).reshape(-1)  # [groups]
    upd_ms = float(per_group[selected].double().sum() / d_group[selected].double().sum())
    w_ms = float((w.square() * d).double().sum() / (d.double().sum() * w.shape[0]))
    if not upd_ms > 0 or not w_ms > 0:
        return None
    eta = step * math.sqrt(w_ms / upd_ms)
    return w + eta * direction, selected


def linearized_v_step(
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    grad: torch.Tensor,
    sq_mean: torch.Tensor,
    fraction: float,
    step: float,
    sweeps: int = 1,
    damp: float = DAMP,
    max_chunk_elements: int = MAX_CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor, CodeUpdateStats]:
    """PV-tuning's linearized V-step on one layer: :func:`linearized_target`, then
    :func:`update_codes` on the selected groups in the metric ``d = damped(sq_mean)``.

    ``codes [O, I, M]`` int64, ``codebooks [M, K, og, g]``, ``scales [O]`` / ``[O, 1, 1, 1]``,
    ``grad [out, in]`` (dL/dŴ), ``sq_mean [in]`` (mean of x² per input column). Returns ``(new
    codes, selected flat group indices, stats)``; codes outside the selection are unchanged.
    """
    num_out, num_in, _ = codes.shape
    _, _, og, g = codebooks.shape
    nbits = max(1, int(math.log2(codebooks.shape[1])))
    weight = dequantize_weight(codes, codebooks.float(), scales.float().reshape(num_out, 1, 1, 1), nbits)
    d = damped_column_weights(sq_mean.float(), damp)
    found = linearized_target(weight, grad, d, fraction, step, og, g)
    if found is None:
        return codes, torch.zeros(0, dtype=torch.int64, device=codes.device), CodeUpdateStats()
    target, selected = found
    new, stats = update_codes(codes, codebooks.float(), scales.float(), target, d, selected, sweeps, max_chunk_elements)
    return new, selected, stats
