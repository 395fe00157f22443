"""LLM-Codebook quantizer: one learned codebook per layer (M=1, out_group_size=1).

Each weight row is divided by a per-row fp16 scale and cut into groups of ``g`` consecutive input
weights; all groups of the layer are clustered together into ``2**B`` centroids of dimension ``g``.
The storage cost is ``B / g`` bits per weight plus the (tiny) codebook and scales, so ``g=4, B=8``
gives ~2 bits/weight.

Plain k-means minimises ``||W - Ŵ||²``, but what matters is the layer output error
``||X Wᵀ - X Ŵᵀ||² / n = tr(ΔW H ΔWᵀ)`` with ``H = XᵀX / n``. Two Hessian-aware variants:

* ``"hessian_diag"``: weighted k-means whose per-coordinate weights are ``diag(H)`` (times the
  row scale squared, so that the error is measured in the original weight space). This is the
  diagonal approximation of the layer objective, and Lloyd's algorithm stays monotone with it.
* ``"gptvq"``: fit the codebook the same way (weights chosen by ``gptvq_fit_weights``), then assign
  codes group by group of ``g`` columns in order, with GPTQ's inverse-Hessian Cholesky error
  feedback: the error of each group is propagated onto the not yet quantized columns, and each
  group's assignment uses the exact (g×g, not diagonal) OBS metric of that group.

Both can finish with a few conjugate-gradient steps on the codebook (codes fixed) against the
full objective ``tr(ΔW H ΔWᵀ)``, which is quadratic in the centroids.

Everything is torch-only, vectorised and chunked so temporaries stay below ``MAX_TEMP_BYTES``;
it runs on the device of the weight.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lit_cb.configs.codebook import (  # noqa: F401 (re-exported: the config lives torch-free)
    ALLOWED_IN_GROUP_SIZES,
    GPTVQ_FIT_WEIGHTS,
    INITS,
    MAX_NBITS,
    MIN_NBITS,
    SCALES,
    WEIGHTINGS,
    CodebookConfig,
)
from lit_cb.layers import CodebookLinear
from lit_cb.quant.objective import damped_hessian, layer_error, relative_layer_error  # noqa: F401 (re-exported)
from lit_cb.quant.registry import register_method

MAX_TEMP_BYTES = 1 << 28  # 256 MiB for the [chunk, K] distance blocks on GPU; well under the 1 GB budget
MAX_TEMP_BYTES_CPU = 1 << 25  # on CPU, cache-sized blocks are faster than big ones
KMEANS_FULL_ITERS = 3  # Lloyd iterations on all vectors after a subsampled fit (see kmeans_max_points)
KMEANSPP_SAMPLE_PER_CLUSTER = 32  # k-means++ runs on a random subsample of this many vectors per centroid
KMEANSPP_SEQUENTIAL_MAX = 4096  # above this many centroids, k-means++ picks several centroids per round
ROW_WEIGHT_FLOOR = 1e-2  # least weight of an output row (relative to the mean) under compression.row_weighting


# --------------------------------------------------------------------------------------------
# Layer objective
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _exact_fp32_matmul() -> Iterator[None]:
    """Distances by the ``|c|² - 2 x·c`` expansion need full fp32; TF32 would pick wrong centroids."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


# --------------------------------------------------------------------------------------------
# Weighted k-means
# --------------------------------------------------------------------------------------------


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # [K, g]
    codes: torch.Tensor  # [N] int64
    history: list[float]  # objective after every assignment and every update step


def weighted_error(x: torch.Tensor, w: torch.Tensor, centroids: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Per-vector error ``sum_j w_nj (x_nj - c_{codes_n, j})²``, shape ``[N]``."""
    d = x - centroids[codes]  # [N, g]
    return d.square_().mul_(w).sum(-1)


def _chunk_rows(num_clusters: int, device: torch.device) -> int:
    # Three live [chunk, K] fp32 temporaries (scores, argmin workspace, matmul output).
    max_bytes = MAX_TEMP_BYTES_CPU if device.type == "cpu" else MAX_TEMP_BYTES
    return max(1, max_bytes // (num_clusters * 4 * 3))


def _argmin_scores(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``argmin_k (a @ bᵀ + bias)[n, k]`` for every row ``n``, chunked over rows.

    a: [N, d], b: [K, d], bias: [K] or None -> [N] int64.
    """
    n, k = a.shape[0], b.shape[0]
    out = torch.empty(n, dtype=torch.int64, device=a.device)
    step = _chunk_rows(k, a.device)
    bt = b.t().contiguous()  # [d, K]
    for s in range(0, n, step):
        scores = a[s : s + step] @ bt  # [chunk, K]
        if bias is not None:
            scores += bias
        out[s : s + step] = scores.argmin(dim=1)
    return out


def _assign(x: torch.Tensor, w: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid under the per-vector diagonal metric ``w``.

    ``sum_j w_j (x_j - c_j)² = const_n + [w, -2 w x] · [c², c]``, one matmul of width ``2g``.
    """
    a = torch.cat([w, -2.0 * w * x], dim=1)  # [N, 2g]
    b = torch.cat([centroids.square(), centroids], dim=1)  # [K, 2g]
    return _argmin_scores(a, b)


def _guarded_assign(
    x: torch.Tensor,
    w: torch.Tensor,
    centroids: torch.Tensor,
    codes: torch.Tensor | None,
    old_err: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Assignment step that can never increase any vector's error.

    The matmul expansion loses a few ulps to cancellation; re-evaluating the old and new errors
    directly and keeping the old code unless the new one is strictly better makes the step
    monotone in the objective as it is actually evaluated. Returns (codes [N], errors [N]).
    """
    new = _assign(x, w, centroids)
    new_err = weighted_error(x, w, centroids, new)
    if codes is None:
        return new, new_err
    if old_err is None:
        old_err = weighted_error(x, w, centroids, codes)
    better = new_err < old_err
    return torch.where(better, new, codes), torch.where(better, new_err, old_err)


def _update_centroids(
    x: torch.Tensor, w: torch.Tensor, codes: torch.Tensor, centroids: torch.Tensor, errors: torch.Tensor
) -> torch.Tensor:
    """Per-coordinate weighted means; empty clusters are re-seeded at the worst-served vectors.

    The weighted mean is the exact minimiser of each cluster's coordinate-separable objective, so
    this step never increases it. An empty cluster contributes nothing to the objective, so moving
    it does not change the objective now and lets the next assignment step lower it.
    """
    k, g = centroids.shape
    num = torch.zeros(k, g, dtype=x.dtype, device=x.device).index_add_(0, codes, w * x)  # [K, g]
    den = torch.zeros(k, g, dtype=x.dtype, device=x.device).index_add_(0, codes, w)  # [K, g]
    new = torch.where(den > 0, num / den.clamp_min(torch.finfo(x.dtype).tiny), centroids)
    counts = torch.bincount(codes, minlength=k)
    empty = (counts == 0).nonzero().flatten()
    if empty.numel():
        n_seed = min(int(empty.numel()), x.shape[0])
        worst = errors.topk(n_seed).indices
        new[empty[:n_seed]] = x[worst]
    return new


def _sample_proportional(p: torch.Tensor, r: int, gen: torch.Generator) -> torch.Tensor:
    """``r`` indices drawn with probability ∝ ``p >= 0`` (inverse CDF; uniform if ``p`` is all zero).

    Used instead of ``torch.multinomial``, which is limited to 2**24 categories and slow on CPU.
    """
    cdf = p.double().cumsum(0)  # [m]
    total = float(cdf[-1])
    if not total > 0:
        return torch.randint(0, p.numel(), (r,), generator=gen, device=gen.device).to(p.device)
    u = torch.rand(r, generator=gen, device=gen.device, dtype=torch.float64).to(p.device) * total
    return torch.searchsorted(cdf, u, right=True).clamp_(max=p.numel() - 1)


def _kmeanspp_init(x: torch.Tensor, w: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Weighted k-means++ on a random subsample: centroids sampled ∝ weighted distance to the nearest.

    Above ``KMEANSPP_SEQUENTIAL_MAX`` centroids several are drawn per round (k-means||-like) so
    that B=16 codebooks do not need 65536 sequential rounds.
    """
    n = x.shape[0]
    m = min(n, KMEANSPP_SAMPLE_PER_CLUSTER * k)
    if m < n:
        idx = torch.randperm(n, generator=gen, device=gen.device)[:m].to(x.device)
        x, w = x[idx], w[idx]
    # Weighted distance to a centroid c is base + [w, -2 w x] · [c², c]: one mat-vec per round.
    a = torch.cat([w, -2.0 * w * x], dim=1)  # [m, 2g]
    base = (w * x.square()).sum(-1)  # [m]
    first = _sample_proportional(w.sum(-1), 1, gen)
    chosen = [first]
    dist = weighted_error(x, w, x[first], torch.zeros(x.shape[0], dtype=torch.int64, device=x.device))
    per_round = max(1, k // KMEANSPP_SEQUENTIAL_MAX)
    total = 1
    while total < k:
        r = min(per_round, k - total)
        pick = _sample_proportional(dist, r, gen)
        chosen.append(pick)
        total += r
        new_c = x[pick]  # [r, g]
        d_new = (a @ torch.cat([new_c.square(), new_c], dim=1).t()).amin(dim=1) + base  # [m]
        dist = torch.minimum(dist, d_new.clamp_min_(0.0))
    return x[torch.cat(chosen)].clone()


def weighted_kmeans(
    x: torch.Tensor,
    w: torch.Tensor,
    num_clusters: int,
    iters: int = 30,
    init: str = "kmeans++",
    seed: int = 0,
    tol: float = 1e-7,
    init_centroids: torch.Tensor | None = None,
) -> KMeansResult:
    """Lloyd's algorithm for ``min sum_n sum_j w_nj (x_nj - c_{a_n, j})²``.

    x, w: [N, g] (w >= 0, per-vector, per-coordinate importance). Every step is non-increasing
    in the objective (see :func:`_guarded_assign`, :func:`_update_centroids`); ``history`` records
    it after the initial assignment and after each update and assignment. Stops after ``iters``
    update steps or when an iteration improves the objective by less than ``tol`` (relative).
    """
    x = x.float()
    w = w.float()
    n, g = x.shape
    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed)
    with _exact_fp32_matmul():
        if init_centroids is not None:
            centroids = init_centroids.to(x).clone()
        elif n <= num_clusters:
            # At most as many vectors as centroids: every vector gets its own centroid (zero error).
            pad = x[torch.randint(0, n, (num_clusters - n,), generator=gen, device=gen.device).to(x.device)]
            centroids = torch.cat([x, pad], dim=0)
        elif init == "kmeans++":
            centroids = _kmeanspp_init(x, w, num_clusters, gen)
        elif init == "random":
            idx = torch.randperm(n, generator=gen, device=gen.device)[:num_clusters].to(x.device)
            centroids = x[idx].clone()
        else:
            raise ValueError(f"init={init!r} is invalid; allowed: {INITS}")
        codes, errors = _guarded_assign(x, w, centroids, None)
        history = [float(errors.double().sum())]
        for _ in range(iters):
            centroids = _update_centroids(x, w, codes, centroids, errors)
            errors = weighted_error(x, w, centroids, codes)
            history.append(float(errors.double().sum()))
            prev = history[-2]
            codes, errors = _guarded_assign(x, w, centroids, codes, errors)
            history.append(float(errors.double().sum()))
            if prev - history[-1] <= tol * max(prev, 1e-30):
                break
    return KMeansResult(centroids=centroids, codes=codes, history=history)


# --------------------------------------------------------------------------------------------
# Hessian helpers, scales
# --------------------------------------------------------------------------------------------


def inverse_hessian_cholesky(h_damped: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = UᵀU``), the factor GPTQ's error feedback uses."""
    lower = torch.linalg.cholesky(h_damped.double())
    hinv = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(hinv, upper=True).float()


def row_scales(weight: torch.Tensor, mode: str | None) -> torch.Tensor:
    """Per-output-row scales ``[out]``, rounded to fp16 (what is stored), never zero."""
    if mode is None:
        s = torch.ones(weight.shape[0], device=weight.device)
    elif mode == "row_max":
        s = weight.abs().amax(dim=1)
    elif mode == "row_norm":
        s = weight.square().mean(dim=1).sqrt()  # RMS: robust to single outliers, unlike the max
    else:
        raise ValueError(f"scale={mode!r} is invalid; allowed: {SCALES}")
    s = s.half().float()
    return torch.where(s > 0, s, torch.ones_like(s))


# --------------------------------------------------------------------------------------------
# GPTVQ error-feedback assignment and codebook refinement
# --------------------------------------------------------------------------------------------


def gptvq_assign(
    weight_n: torch.Tensor, codebook: torch.Tensor, hinv_chol: torch.Tensor, block_size: int
) -> torch.Tensor:
    """Assign codes group by group of ``g`` columns with GPTQ-style inverse-Hessian error feedback.

    weight_n: [out, in] weights divided by their row scales; codebook: [K, g];
    hinv_chol: [in, in] upper ``U`` with ``H⁻¹ = UᵀU``. Returns codes [out, in // g].

    For the group ``J`` of columns about to be fixed (all earlier ones fixed, later ones free),
    the OBS loss of an error ``δ`` (per row) is ``δ (U_JJᵀ U_JJ)⁻¹ δᵀ = ||δ U_JJ⁻¹||²``, so the
    nearest centroid is found after mapping both rows and centroids by ``L_J = U_JJ⁻¹``; the
    optimal compensation of the later columns is ``-δ L_J U_{J, rest}``. Since the row scale is a
    constant per row, the feedback can run on the normalised weights. For g=1 this is GPTQ.
    """
    out_f, in_f = weight_n.shape
    k, g = codebook.shape
    ng = in_f // g
    w = weight_n.float().clone()
    u = hinv_chol.float()
    # Inverse of every diagonal g×g block of U, batched: [ng, g, g]
    blocks = u.reshape(ng, g, ng, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    eye = torch.eye(g, device=u.device).expand(ng, g, g)
    inv_blocks = torch.linalg.solve_triangular(blocks, eye, upper=True)  # [ng, g, g]
    cb_t = torch.einsum("kg,ngh->nkh", codebook, inv_blocks)  # [ng, K, g] mapped centroids
    cb_bias = cb_t.square().sum(-1)  # [ng, K]
    codes = torch.empty(out_f, ng, dtype=torch.int64, device=w.device)
    for b0 in range(0, in_f, block_size):
        b1 = min(b0 + block_size, in_f)
        wb = w[:, b0:b1].clone()  # [out, bs]
        err = torch.zeros_like(wb)  # [out, bs] scaled errors δ L_J
        for j0 in range(0, b1 - b0, g):
            gi = (b0 + j0) // g
            cols = slice(j0, j0 + g)
            x_t = wb[:, cols] @ inv_blocks[gi]  # [out, g]
            c = _argmin_scores(-2.0 * x_t, cb_t[gi], cb_bias[gi])  # [out]
            codes[:, gi] = c
            e = (wb[:, cols] - codebook[c]) @ inv_blocks[gi]  # [out, g]
            err[:, cols] = e
            if j0 + g < b1 - b0:
                wb[:, j0 + g :] -= e @ u[b0 + j0 : b0 + j0 + g, b0 + j0 + g : b1]
        if b1 < in_f:
            w[:, b1:] -= err @ u[b0:b1, b1:]
    return codes


def _expand(codebook: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Dense ``[out, in]`` from codebook [K, g], codes [out, ng], scales [out]."""
    out_f, ng = codes.shape
    return (codebook[codes] * scales[:, None, None]).reshape(out_f, ng * codebook.shape[1])


def _scatter_to_codebook(g_w: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, k: int) -> torch.Tensor:
    """Adjoint of :func:`_expand`: ``sum_{o,i: codes=k} s_o G[o, i]`` -> [K, g]."""
    out_f, ng = codes.shape
    gsz = g_w.shape[1] // ng
    vals = (g_w.reshape(out_f, ng, gsz) * scales[:, None, None]).reshape(-1, gsz)  # [out*ng, g]
    return torch.zeros(k, gsz, dtype=g_w.dtype, device=g_w.device).index_add_(0, codes.reshape(-1), vals)


def refine_codebook(
    weight: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    codebook: torch.Tensor,
    hessian: torch.Tensor,
    steps: int,
    row_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Minimise ``sum_o r_o ((W - Ŵ(C)) H (W - Ŵ(C))ᵀ)_oo`` over the centroids ``C`` with the codes
    fixed (``r`` = ``row_weights``, all ones when None: ``tr((W - Ŵ) H (W - Ŵ)ᵀ)``).

    The objective is quadratic in ``C`` (normal equations ``A C = b`` of size ``K·g``), so
    Jacobi-preconditioned conjugate gradients is the natural solver: each step costs one
    ``[out, in] @ [in, in]`` matmul and, in exact arithmetic, never increases the objective.
    The fp32 result is only kept if it evaluates no worse (after fp16 rounding) than the input.
    """
    if steps <= 0:
        return codebook
    k, g = codebook.shape
    h = hessian.float()
    c = codebook.float().clone()
    r_o = torch.ones(codes.shape[0], device=weight.device) if row_weights is None else row_weights.float()
    # Jacobi preconditioner: the diagonal of A restricted to each vector's own g coordinates.
    hdiag = h.diagonal().reshape(1, -1).expand(codes.shape[0], -1)  # [out, in]
    precond = _scatter_to_codebook(hdiag * (scales * r_o)[:, None], codes, scales, k)  # [K, g]
    precond = torch.where(precond > 0, precond, torch.ones_like(precond))
    r = _scatter_to_codebook(((weight - _expand(c, codes, scales)) @ h) * r_o[:, None], codes, scales, k)
    z = r / precond
    p = z.clone()
    rz = float((r * z).sum())
    for _ in range(steps):
        ap = _scatter_to_codebook((_expand(p, codes, scales) @ h) * r_o[:, None], codes, scales, k)
        pap = float((p * ap).sum())
        if pap <= 0 or rz <= 0:
            break
        alpha = rz / pap
        c += alpha * p
        r -= alpha * ap
        z = r / precond
        rz_new = float((r * z).sum())
        p = z + (rz_new / rz) * p
        rz = rz_new
    c_half = c.half().float()
    before = row_weighted_error(weight, _expand(codebook.float(), codes, scales), h, r_o)
    after = row_weighted_error(weight, _expand(c_half, codes, scales), h, r_o)
    return c_half if after <= before else codebook


def row_weighted_error(
    weight: torch.Tensor, weight_hat: torch.Tensor, hessian: torch.Tensor, row_weights: torch.Tensor
) -> float:
    """``sum_o r_o (ΔW H ΔWᵀ)_oo`` in fp32: the objective :func:`refine_codebook` lowers."""
    with torch.no_grad():
        delta = weight.float() - weight_hat.float()
        return float((((delta @ hessian.float()) * delta).sum(1) * row_weights.float()).sum())


def normalised_row_weights(row_weights: torch.Tensor, out_features: int) -> torch.Tensor:
    """``row_weights`` divided by their mean and floored at ``ROW_WEIGHT_FLOOR``: the objective's
    minimiser does not depend on their scale, so a mean of one keeps the k-means weights (and the
    damping they meet) at the unweighted method's scale, and the floor keeps every row in the fit
    (an empirical Fisher from a few windows can be ~0 on rows that still matter)."""
    r = row_weights.detach().double().flatten()
    if r.numel() != out_features:
        raise ValueError(f"row_weights has {r.numel()} entries; the layer has {out_features} output rows")
    if not bool(torch.isfinite(r).all()) or bool((r < 0).any()) or float(r.sum()) <= 0:
        raise ValueError("row_weights must be finite, >= 0 and not all zero")
    r = r / r.mean()
    return r.clamp_min(ROW_WEIGHT_FLOOR).float()


# --------------------------------------------------------------------------------------------
# The registered transform
# --------------------------------------------------------------------------------------------


@dataclass
class CodebookQuantResult:
    codes: torch.Tensor  # [out, in // g] int64
    codebook: torch.Tensor  # [K, g] fp32 holding fp16-representable values
    scales: torch.Tensor  # [out] fp32 holding fp16-representable values
    kmeans_history: list[float]


def codebook_quantize_tensors(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    config: CodebookConfig,
    row_weights: torch.Tensor | None = None,
) -> CodebookQuantResult:
    """Codes, codebook and scales for one ``[out, in]`` weight; see the module docstring.

    ``row_weights`` (``[out]``, e.g. the float model's empirical Fisher of each output,
    ``compression.row_weighting``) make the codebook fit the objective ``sum_o r_o (ΔW H ΔWᵀ)_oo``:
    one codebook serves every row, so it should spend its centroids where an output's error costs
    the loss most. They weight the k-means and the codebook refinement; the GPTVQ assignment is
    per row and does not change with them."""
    out_f, in_f = weight.shape
    g, k = config.in_group_size, config.codebook_size
    if in_f % g:
        raise ValueError(f"in_features={in_f} is not divisible by in_group_size={g}")
    w = weight.float()
    scales = row_scales(w, config.scale)  # [out]
    wn = w / scales[:, None]  # [out, in]
    x = wn.reshape(-1, g)  # [out * ng, g]

    if config.weighting != "none" and hessian is None:
        raise ValueError(f"weighting={config.weighting!r} needs a Hessian")
    h = damped_hessian(hessian.to(w.device), config.damp) if hessian is not None else None
    u = None
    if config.weighting == "none":
        col_w = torch.ones(in_f, device=w.device)
    elif config.weighting == "gptvq" and config.gptvq_fit_weights == "hinv_chol":
        u = inverse_hessian_cholesky(h)
        col_w = u.diagonal().square().reciprocal()  # GPTQ's per-column saliency 1 / U_jj²
    else:
        col_w = h.diagonal().clone()
    # Error in the original space is s_o² times the error in the normalised space.
    row_w = scales.square()
    r_o = None
    if row_weights is not None:
        r_o = normalised_row_weights(row_weights.to(w.device), out_f)
        row_w = row_w * r_o
    vw = (row_w[:, None] * col_w[None, :]).reshape(-1, g)  # [out * ng, g]

    n = x.shape[0]
    if config.kmeans_max_points is not None and n > config.kmeans_max_points:
        # Fit on a random subsample (the costly part on CPU), then polish on every vector.
        gen = torch.Generator(device=x.device)
        gen.manual_seed(config.seed + 1)
        idx = torch.randperm(n, generator=gen, device=gen.device)[: config.kmeans_max_points].to(x.device)
        sub = weighted_kmeans(x[idx], vw[idx], k, iters=config.kmeans_iters, init=config.init, seed=config.seed)
        km = weighted_kmeans(x, vw, k, iters=min(KMEANS_FULL_ITERS, config.kmeans_iters), init_centroids=sub.centroids)
        km.history = sub.history + km.history
    else:
        km = weighted_kmeans(x, vw, k, iters=config.kmeans_iters, init=config.init, seed=config.seed)
    codebook = km.centroids.half().float()  # what is stored; later steps see the rounded values
    with _exact_fp32_matmul():
        if config.weighting == "gptvq":
            if u is None:
                u = inverse_hessian_cholesky(h)
            codes = gptvq_assign(wn, codebook, u, config.gptvq_block_size)
        else:
            codes, _ = _guarded_assign(x, vw, codebook, km.codes)
            codes = codes.reshape(out_f, in_f // g)
        if config.weighting != "none":  # "none" stays the plain k-means ablation baseline
            codebook = refine_codebook(w, codes, scales, codebook, h, config.codebook_update_steps, r_o)
    return CodebookQuantResult(codes=codes, codebook=codebook, scales=scales, kmeans_history=km.history)


@register_method(CodebookConfig, "codebook")
def quantize_codebook(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    config: CodebookConfig,
    bias: torch.Tensor | None = None,
    row_weights: torch.Tensor | None = None,
) -> CodebookLinear:
    """Compress one linear layer's ``[out, in]`` fp32 weight into a :class:`CodebookLinear`."""
    out_f, in_f = weight.shape
    res = codebook_quantize_tensors(weight, hessian, config, row_weights)
    fmt = config.make_format(in_f, out_f, bias is not None)
    return CodebookLinear.from_tensors(
        fmt,
        res.codes.reshape(out_f, in_f // config.in_group_size, 1),  # [num_out_groups, num_in_groups, 1]
        res.codebook.reshape(1, config.codebook_size, 1, config.in_group_size).half(),  # [1, K, 1, g]
        res.scales.reshape(out_f, 1, 1, 1).half(),  # [num_out_groups, 1, 1, 1]
        None if bias is None else bias.half(),
    )
