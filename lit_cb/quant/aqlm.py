"""AQLM: additive multi-codebook quantization of one linear layer (Egiazarian et al., 2024).

Every group of ``in_group_size`` (g) input weights of an output group ``o`` is approximated by
``scales[o] * sum_m codebooks[m, codes[o, i, m]]`` with ``M`` codebooks of ``2**B`` vectors. The
objective is the layer's output error on the calibration data, ``tr(ΔW H ΔWᵀ)`` with
``H = XᵀX / n`` (``ΔW = W - Ŵ``), which equals ``||X Wᵀ - X Ŵᵀ||² / n``.

Algorithm (own implementation, written from the paper's description):

1. **Initialisation**: residual k-means. Rows are normalised by their RMS (the initial scales),
   then k-means fits codebook 1 on the weight groups, codebook 2 on what codebook 1 left, etc.
   By default each coordinate's error is weighted by ``scale² H_jj`` (the objective's diagonal).
2. **Codes**: beam search on the exact objective, one codebook at a time, sweeping the input
   groups in order. All hypotheses of a row differ only in groups already visited, so the
   objective change of re-coding group ``i`` is exact and cheap: it needs the precomputed
   unary term ``C_k H_ii C_kᵀ`` of each codeword, the cross term with the current codeword
   (``C_k · H_ii C_cur``, which carries the pairwise coupling between codebooks) and the linear
   term ``C_k · (R H)_i`` where ``R H`` (residual times Hessian) carries the coupling to every
   other group. ``R H`` is kept per hypothesis and updated with a rank-g product after each
   step, so one step is a handful of batched ops over *all* rows at once; no Python loop ever
   runs over rows. Rows are independent, so they are processed in chunks that bound memory.
   A per-row guard keeps the old codes wherever the new ones are not better, so beam search
   never makes the objective worse.
3. **Codebooks and scales**: Adam on the same objective, ``((ΔW H) * ΔW).sum()``, keeping the
   best iterate.
4. Alternate 2 and 3 until the relative improvement of an epoch falls below ``relative_tol``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

from lit_cb.configs.aqlm import AQLM_PRESETS, AQLMConfig  # noqa: F401 (re-exported: the config lives torch-free)
from lit_cb.layers import CodebookLinear, dequantize_weight
from lit_cb.quant import beam_graphs
from lit_cb.quant.objective import damped_hessian
from lit_cb.quant.registry import register_method

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Objective


def layer_objective(weight: torch.Tensor, reconstruction: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """``tr(ΔW H ΔWᵀ)`` = ``||X Wᵀ - X Ŵᵀ||² / n`` for ``H = XᵀX / n``; a 0-dim tensor.

    Computed as ``((ΔW H) * ΔW).sum()``: one ``[out, in] x [in, in]`` matmul, never touching X.
    """
    delta = weight - reconstruction  # [out, in]
    return ((delta @ hessian) * delta).sum()


def _row_group_objective(delta: torch.Tensor, hessian: torch.Tensor, out_group_size: int) -> torch.Tensor:
    """Objective per output group, ``[num_out_groups]``; the objective is separable over them."""
    per_row = ((delta @ hessian) * delta).sum(-1)  # [out]
    return per_row.view(-1, out_group_size).sum(-1)


def reconstruct(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Dense ``[out, in]`` weight from int64 codes ``[O, I, M]``, codebooks ``[M, K, og, g]`` and
    scales ``[O]`` (differentiable in codebooks and scales)."""
    nbits = max(1, int(math.log2(codebooks.shape[1])))
    return dequantize_weight(codes, codebooks, scales.view(-1, 1, 1, 1), nbits)


# --------------------------------------------------------------------------------------------
# Initialisation: residual k-means


def _nearest_centroid(
    points: torch.Tensor, centroids: torch.Tensor, max_chunk_elements: int, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index ``[N]`` and (weighted) squared distance ``[N]`` of each point's nearest centroid,
    computed in chunks of points so the ``[chunk, K]`` distance matrix stays bounded. With
    per-coordinate ``weights [N, d]`` the distance is ``sum_j w_j (x_j - c_j)²``."""
    num_points, num_centroids = points.shape[0], centroids.shape[0]
    chunk = max(1, max_chunk_elements // num_centroids)
    c_sq = centroids * centroids  # [K, d]
    c_norm = c_sq.sum(-1)  # [K]
    index = torch.empty(num_points, dtype=torch.int64, device=points.device)
    dist = torch.empty(num_points, dtype=points.dtype, device=points.device)
    for start in range(0, num_points, chunk):
        block = points[start : start + chunk]  # [chunk, d]
        if weights is None:
            scores = c_norm[None, :] - 2 * block @ centroids.T  # [chunk, K]; ||x||² dropped
            x_term = (block * block).sum(-1)
        else:
            w = weights[start : start + chunk]  # [chunk, d]
            scores = w @ c_sq.T - 2 * (w * block) @ centroids.T  # [chunk, K]; sum w x² dropped
            x_term = (w * block * block).sum(-1)
        best, idx = scores.min(dim=1)
        index[start : start + chunk] = idx
        dist[start : start + chunk] = (best + x_term).clamp_min(0)
    return index, dist


def kmeans(
    points: torch.Tensor,
    num_centroids: int,
    iters: int,
    generator: torch.Generator,
    max_chunk_elements: int,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on ``points [N, d]`` (optionally with per-coordinate ``weights [N, d]``);
    returns ``(centroids [K, d], assignment [N])``.

    Seeded with random data points (with replacement and a little noise when N < K, which
    happens for 16-bit codebooks on small layers); empty clusters are re-seeded at the points
    with the largest error so no codeword is wasted.
    """
    num_points, dim = points.shape
    device = points.device
    if num_points >= num_centroids:
        pick = torch.randperm(num_points, generator=generator, device="cpu")[:num_centroids].to(device)
        centroids = points[pick].clone()
    else:
        pick = torch.randint(num_points, (num_centroids,), generator=generator, device="cpu").to(device)
        noise = torch.randn(num_centroids, dim, generator=generator, device="cpu").to(device, points.dtype)
        centroids = points[pick] + 1e-3 * points.std().clamp_min(1e-8) * noise
    assign, dist = _nearest_centroid(points, centroids, max_chunk_elements, weights)
    for _ in range(iters):
        if weights is None:
            sums = torch.zeros_like(centroids).index_add_(0, assign, points)  # [K, d]
            mass = torch.bincount(assign, minlength=num_centroids).to(points.dtype)[:, None].expand_as(sums)
        else:
            sums = torch.zeros_like(centroids).index_add_(0, assign, weights * points)  # [K, d]
            mass = torch.zeros_like(centroids).index_add_(0, assign, weights)  # [K, d]
        filled = mass > 0
        centroids = torch.where(filled, sums / mass.clamp_min(1e-30), centroids)
        nonempty = torch.bincount(assign, minlength=num_centroids) > 0  # [K]
        num_empty = int((~nonempty).sum())
        if num_empty and num_points >= num_centroids:
            worst = dist.topk(min(num_empty, num_points)).indices
            empty_idx = (~nonempty).nonzero().squeeze(1)[: worst.numel()]
            centroids[empty_idx] = points[worst]
        assign, dist = _nearest_centroid(points, centroids, max_chunk_elements, weights)
    return centroids, assign


def residual_kmeans_init(
    weight: torch.Tensor, config: AQLMConfig, generator: torch.Generator, hessian: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes ``[O, I, M]`` (int64), codebooks ``[M, K, og, g]`` and scales ``[O]`` from residual
    k-means on the row-normalised weight groups (scales are the RMS of each output group).

    With ``hessian`` given, every coordinate's squared error is weighted by ``scale_o² H_jj``,
    the diagonal part of the layer objective, so the initial codebooks already spend their
    resolution on the inputs that matter; beam search then handles the off-diagonal coupling.
    """
    out_features, in_features = weight.shape
    og, g = config.out_group_size, config.in_group_size
    num_out, num_in = out_features // og, in_features // g
    blocks = weight.view(num_out, og, num_in, g).permute(0, 2, 1, 3)  # [O, I, og, g]
    if config.per_row_scales:
        scales = blocks.pow(2).mean(dim=(1, 2, 3)).sqrt().clamp_min(1e-8)  # [O]
    else:
        scales = torch.ones(num_out, dtype=weight.dtype, device=weight.device)
    residual = (blocks / scales.view(-1, 1, 1, 1)).reshape(num_out * num_in, og * g)  # [O*I, og*g]
    weights = None
    if hessian is not None:
        diag = hessian.diagonal().clamp_min(0).view(1, num_in, 1, g)  # [1, I, 1, g]
        w = (scales.view(-1, 1, 1, 1) ** 2) * diag  # [O, I, 1, g]
        w = w / w.mean().clamp_min(1e-30) + 1e-6  # keeps dead inputs from having exactly zero weight
        weights = w.expand(num_out, num_in, og, g).reshape(num_out * num_in, og * g)  # [O*I, og*g]
    codebooks, codes = [], []
    for _ in range(config.num_codebooks):
        centroids, assign = kmeans(
            residual, config.codebook_size, config.init_kmeans_iters, generator, config.max_chunk_elements, weights
        )
        residual = residual - centroids[assign]
        codebooks.append(centroids.view(config.codebook_size, og, g))
        codes.append(assign.view(num_out, num_in))
    return torch.stack(codes, dim=-1), torch.stack(codebooks), scales


# --------------------------------------------------------------------------------------------
# Codes: beam search


LAZY_BLOCK = 32
"""Input groups between materialisations of the hypotheses' ``R H`` in the beam search (:func:`_beam_search_chunk`):
32 groups of 8 make ``[.., 256] x [256, in_rest]`` updates, and a 32nd of the per-step traffic."""


def beam_search_codes(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    codebook_index: int,
    beam_size: int,
    max_chunk_elements: int = 2**26,
    lazy_block: int = LAZY_BLOCK,
) -> torch.Tensor:
    """Re-choose the codes of codebook ``codebook_index`` by beam search on ``tr(ΔW H ΔWᵀ)``.

    ``weight [out, in]``, ``hessian [in, in]`` (symmetric), ``codes [O, I, M]`` int64,
    ``codebooks [M, K, og, g]``, ``scales [O]``. Returns new int64 codes ``[O, I, M]`` (only
    column ``codebook_index`` changes) whose objective is no worse than the given codes' for
    every output group (hence overall).
    """
    out_features, in_features = weight.shape
    num_out, num_in, _ = codes.shape
    _, num_codewords, og, g = codebooks.shape
    codes = codes.clone()
    old_column = codes[:, :, codebook_index].clone()  # [O, I]
    with torch.no_grad():
        delta = weight - reconstruct(codes, codebooks, scales)  # [out, in]
        old_loss = _row_group_objective(delta, hessian, og)  # [O]
        per_row = beam_size * og * max(in_features, num_codewords)
        chunk = max(1, max_chunk_elements // per_row)
        diag_blocks, unary = _group_terms(hessian, codebooks[codebook_index])

        def search(delta_rows, hessian_, current, codebook, scales_rows, diag_blocks_, unary_):
            return _beam_search_chunk(
                delta_rows, hessian_, current, codebook, scales_rows, beam_size, diag_blocks_, unary_, lazy_block
            )

        for start in range(0, num_out, chunk):
            rows = slice(start, min(start + chunk, num_out))
            tensors = (
                delta.view(num_out, og, in_features)[rows],
                hessian,
                codes[rows, :, codebook_index],
                codebooks[codebook_index],
                scales[rows],
                diag_blocks,
                unary,
            )
            state = (rows.stop - rows.start) * beam_size * og * in_features
            if beam_graphs.enabled(delta) and state <= beam_graphs.MAX_STATE_ELEMENTS:
                found = beam_graphs.run(search, tensors, (beam_size, lazy_block))
            else:
                found = search(*tensors)
            codes[rows, :, codebook_index] = found
        new_delta = weight - reconstruct(codes, codebooks, scales)
        new_loss = _row_group_objective(new_delta, hessian, og)  # [O]
        worse = new_loss > old_loss
        if bool(worse.any()):
            # Float drift of the incremental scores can only ever make a tie look like a gain;
            # keep the old codes of those output groups so the objective never rises.
            codes[worse, :, codebook_index] = old_column[worse]
    return codes


def _group_terms(hessian: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Diagonal blocks ``H_ii`` ``[I, g, g]`` and the unary term ``sum_r C_k[r] H_ii C_k[r]ᵀ`` of
    every codeword in every group ``[I, K]`` (via codeword outer products, so even 2**16
    codewords need no ``[K, I, g]`` intermediate)."""
    num_codewords, og, g = codebook.shape
    num_in = hessian.shape[0] // g
    diag_blocks = hessian.view(num_in, g, num_in, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [I, g, g]
    outer = torch.einsum("krg,krh->kgh", codebook, codebook).reshape(num_codewords, g * g)  # [K, g*g]
    unary = diag_blocks.reshape(num_in, g * g) @ outer.T  # [I, K]
    return diag_blocks.contiguous(), unary


def _beam_search_chunk(
    delta: torch.Tensor,
    hessian: torch.Tensor,
    current: torch.Tensor,
    codebook: torch.Tensor,
    scales: torch.Tensor,
    beam_size: int,
    diag_blocks: torch.Tensor,
    unary: torch.Tensor,
    lazy_block: int = LAZY_BLOCK,
) -> torch.Tensor:
    """Beam search for one codebook over a chunk of output groups.

    ``delta [Oc, og, in]`` residual ``W - Ŵ``; ``current [Oc, I]`` this codebook's codes;
    ``codebook [K, og, g]``; ``scales [Oc]``; ``diag_blocks [I, g, g]`` and ``unary [I, K]``
    from :func:`_group_terms`. Returns the best hypothesis' codes ``[Oc, I]``.

    Each step scores group ``i``'s codewords from ``(R H)[:, group i]`` of every hypothesis, where ``R`` is the
    hypothesis' residual. Keeping ``R H`` of every hypothesis on every column still to visit, reordered by beam
    parent and updated by a rank-g product after each step, reads and writes ``Oc x beam x in`` floats per step:
    ``O(in^2)`` traffic per row, which dominated wide layers (LLaMA-7B's down projection). Here, as GPTQ batches
    its updates, ``R H`` is materialised once per ``lazy_block`` groups, for the hypotheses alive at the block's
    start; a hypothesis inside the block reads its block-start ancestor's columns and subtracts its own changes
    in the block times ``H`` (a ``[.., l g] x [l g, g]`` product). At the block's end one gather by ancestor and
    one ``[.., lazy_block g] x [lazy_block g, in_rest]`` product bring ``R H`` forward: the same arithmetic, a
    ``lazy_block``-th of the traffic, and wider products.
    """
    num_rows, og, in_features = delta.shape
    num_codewords, _, g = codebook.shape
    num_in = in_features // g
    flat_codebook = codebook.reshape(num_codewords, og * g)  # [K, og*g]
    s_col = scales.view(num_rows, 1)  # [Oc, 1]   broadcasts over hypotheses
    s4 = scales.view(num_rows, 1, 1, 1)  # [Oc, 1, 1, 1]   broadcasts over hypotheses and a group
    # loop invariants (each step is ~30 small ops: on a GPU their launches, not their arithmetic, set the time)
    neg2_s4 = -2 * s4
    s2_3 = (s_col * s_col).unsqueeze(-1)  # [Oc, 1, 1]
    full_offsets = torch.arange(num_rows, device=delta.device)[:, None] * beam_size  # once nb reaches the beam

    # base: R H of the hypotheses alive at the block's start (start column first), [Oc * nb_start, og, in_rest]
    base = delta @ hessian  # [Oc, og, in]: the one hypothesis (the given codes) at step 0
    # [Oc, nb]: each hypothesis' block-start ancestor, as an index into base's first axis
    ancestor = torch.arange(num_rows, device=delta.device).unsqueeze(1)
    history = delta.new_zeros(num_rows, 1, og, 0)  # [Oc, nb, og, l g]: changes of groups visited in this block
    block_start = 0
    scores = torch.zeros(num_rows, 1, dtype=delta.dtype, device=delta.device)  # [Oc, beam]
    hyp_codes = current.unsqueeze(1).clone()  # [Oc, beam, I]
    kk = min(beam_size, num_codewords)
    arange_rows = torch.arange(num_rows, device=delta.device)
    for i in range(num_in):
        nb = hyp_codes.shape[1]
        local = i - block_start
        cur_word = codebook[current[:, i]]  # [Oc, og, g]; identical across hypotheses (unvisited group)
        h_cur = cur_word @ diag_blocks[i]  # [Oc, og, g]  (H_ii symmetric)
        # (R H)[:, group i] of every hypothesis: its ancestor's, less its changes in this block times H
        g_i = base[:, :, local * g : (local + 1) * g].index_select(0, ancestor.view(-1)).view(num_rows, nb, og, g)
        if local:
            h_block = hessian[block_start * g : i * g, i * g : (i + 1) * g]  # [l g, g]
            g_i = g_i - (history.reshape(num_rows * nb * og, local * g) @ h_block).view(num_rows, nb, og, g)
        # delta_k = C_k · q + s² unary_k + const, with t = G_i + s H_ii C_cur, q = -2 s t and
        # const = 2 s G_i · C_cur + s² C_cur H_ii C_cur = s (G_i + t) · C_cur.
        t = g_i + (h_cur * s_col.unsqueeze(-1)).unsqueeze(1)  # [Oc, nb, og, g]
        const = ((g_i + t) * cur_word.unsqueeze(1)).sum((-1, -2)) * s_col  # [Oc, nb]
        q = t * neg2_s4
        cand = torch.mm(q.reshape(num_rows * nb, og * g), flat_codebook.T).view(num_rows, nb, -1)  # [Oc, nb, K]
        cand = cand + s2_3 * unary[i] + (scores + const).unsqueeze(-1)
        # Two-stage top-k (exact): the best `beam` children overall are among each parent's best `beam`.
        best_val, best_word = cand.topk(kk, dim=-1, largest=False)  # [Oc, nb, kk]
        new_nb = min(beam_size, nb * kk)
        scores, flat_idx = best_val.view(num_rows, nb * kk).topk(new_nb, dim=-1, largest=False)  # [Oc, new_nb]
        parent = flat_idx // kk  # [Oc, new_nb]
        words = best_word.view(num_rows, nb * kk).gather(1, flat_idx)  # [Oc, new_nb]
        # Flat (row, parent) indices: index_select copies whole rows, much faster than fancy indexing.
        offsets = full_offsets if nb == beam_size else arange_rows[:, None] * nb
        flat_parent = (parent + offsets).view(-1)  # [Oc * new_nb]
        hyp_codes = hyp_codes.view(num_rows * nb, num_in).index_select(0, flat_parent).view(num_rows, new_nb, -1)
        hyp_codes[:, :, i] = words
        if i + 1 == num_in:
            break
        # The residual change of group i joins the block's history of each surviving hypothesis.
        change = s4 * (codebook[words] - cur_word.unsqueeze(1))  # [Oc, new_nb, og, g]
        history = history.reshape(num_rows * nb, og, local * g).index_select(0, flat_parent)
        history = torch.cat([history.view(num_rows, new_nb, og, local * g), change], dim=-1)
        ancestor = ancestor.gather(1, parent)
        if local + 1 == lazy_block:
            # Block end: R' H = R H - changes @ H[block, :] on the columns after the block, per hypothesis.
            rest = base[:, :, (local + 1) * g :].index_select(0, ancestor.view(-1))  # [Oc * new_nb, og, in_rest]
            h_rows = hessian[block_start * g : (i + 1) * g, (i + 1) * g :]  # [B g, in_rest]
            rest.view(-1, rest.shape[-1]).addmm_(history.reshape(-1, h_rows.shape[0]), h_rows, alpha=-1.0)
            base = rest
            ancestor = torch.arange(num_rows * new_nb, device=delta.device).view(num_rows, new_nb)
            history = delta.new_zeros(num_rows, new_nb, og, 0)
            block_start = i + 1
    best = scores.argmin(dim=1)  # [Oc]
    return hyp_codes[arange_rows, best]  # [Oc, I]


def beam_search_all(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    beam_size: int,
    max_chunk_elements: int = 2**26,
) -> torch.Tensor:
    """One beam-search pass over every codebook in turn (each sees the others' new codes)."""
    for m in range(codebooks.shape[0]):
        codes = beam_search_codes(weight, hessian, codes, codebooks, scales, m, beam_size, max_chunk_elements)
    return codes


# --------------------------------------------------------------------------------------------
# Codebooks and scales: Adam


def optimize_codebooks(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    steps: int,
    lr: float,
    train_scales: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Adam on ``tr(ΔW H ΔWᵀ)`` over codebooks ``[M, K, og, g]`` (and scales ``[O]``), codes fixed.

    The loss is divided by ``tr(W H Wᵀ)`` so Adam's epsilon behaves the same on every layer.
    Returns the best iterate seen (never worse than the input) and its objective (unnormalised).
    """
    norm = layer_objective(weight, torch.zeros_like(weight), hessian).clamp_min(1e-30).detach()
    book = codebooks.detach().clone().requires_grad_(True)
    scale = scales.detach().clone().requires_grad_(train_scales)
    params = [book, scale] if train_scales else [book]
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.95))
    # Best iterate tracked on the device (no host sync per step).
    best_loss = torch.full((), math.inf, device=weight.device)
    best_book, best_scale = book.detach().clone(), scale.detach().clone()
    for step in range(steps + 1):
        with torch.enable_grad():
            approx = reconstruct(codes, book, scale)  # [out, in], differentiable
        delta = weight - approx.detach()
        delta_h = delta @ hessian  # [out, in]; one matmul gives both the loss and its gradient
        value = (delta_h * delta).sum() / norm
        better = value < best_loss
        best_loss = torch.where(better, value, best_loss)
        best_book = torch.where(better, book.detach(), best_book)
        best_scale = torch.where(better, scale.detach(), best_scale)
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        approx.backward(delta_h * (-2.0 / norm))  # d tr(ΔW H ΔWᵀ) / dŴ = -2 ΔW H  (H symmetric)
        opt.step()
    return best_book, best_scale, float(best_loss * norm)


# --------------------------------------------------------------------------------------------
# Driver


@dataclass
class AQLMResult:
    """Tensors and diagnostics of one quantized layer (objective values are ``tr(ΔW H ΔWᵀ)``)."""

    codes: torch.Tensor  # [O, I, M] int64
    codebooks: torch.Tensor  # [M, K, og, g] fp32
    scales: torch.Tensor  # [O] fp32
    init_objective: float
    final_objective: float
    reference: float  # tr(W H Wᵀ): objective of the all-zero weight, for relative errors
    history: list[float]
    epochs: int
    seconds: float

    @property
    def relative_error(self) -> float:
        return self.final_objective / max(self.reference, 1e-30)


def aqlm_quantize(weight: torch.Tensor, hessian: torch.Tensor, config: AQLMConfig) -> AQLMResult:
    """Run AQLM on a float ``[out, in]`` weight with Hessian ``[in, in]``; see the module docstring."""
    start = time.perf_counter()
    weight = weight.detach().float()
    out_features, in_features = weight.shape
    config.layer_format(out_features, in_features)  # validates divisibility with a clear error
    if tuple(hessian.shape) != (in_features, in_features):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}, expected {(in_features, in_features)}")
    hessian = damped_hessian(hessian.detach().to(weight.device, torch.float32), config.damp)
    generator = torch.Generator(device="cpu").manual_seed(config.seed)

    with torch.no_grad():
        init_hessian = hessian if config.hessian_weighted_init else None
        codes, codebooks, scales = residual_kmeans_init(weight, config, generator, init_hessian)
        reference = float(layer_objective(weight, torch.zeros_like(weight), hessian))
        loss = float(layer_objective(weight, reconstruct(codes, codebooks, scales), hessian))
    init_loss = loss
    history = [loss]
    epochs = 0
    for epoch in range(config.max_epochs):
        codes = beam_search_all(weight, hessian, codes, codebooks, scales, config.beam_size, config.max_chunk_elements)
        codebooks, scales, new_loss = optimize_codebooks(
            weight,
            hessian,
            codes,
            codebooks,
            scales,
            config.codebook_steps,
            config.codebook_lr,
            train_scales=config.per_row_scales,
        )
        history.append(new_loss)
        epochs = epoch + 1
        improvement = (loss - new_loss) / max(loss, 1e-30)
        log.debug("aqlm epoch %d: objective %.6g (relative %.4g)", epochs, new_loss, new_loss / reference)
        loss = min(loss, new_loss)
        if improvement < config.relative_tol:
            break
    return AQLMResult(
        codes=codes,
        codebooks=codebooks.detach(),
        scales=scales.detach(),
        init_objective=init_loss,
        final_objective=loss,
        reference=reference,
        history=history,
        epochs=epochs,
        seconds=time.perf_counter() - start,
    )


@register_method(AQLMConfig, "aqlm")
def quantize_aqlm(
    weight: torch.Tensor, hessian: torch.Tensor, config: AQLMConfig, bias: torch.Tensor | None = None
) -> CodebookLinear:
    """Registered transform: AQLM-compress one ``[out, in]`` weight into a :class:`CodebookLinear`
    (fp16 codebooks and scales). Diagnostics land in ``layer.aqlm_stats`` (not serialised)."""
    result = aqlm_quantize(weight, hessian, config)
    fmt = config.layer_format(weight.shape[0], weight.shape[1], bias=bias is not None)
    layer = CodebookLinear.from_tensors(fmt, result.codes, result.codebooks, result.scales.view(-1, 1, 1, 1), bias)
    layer.aqlm_stats = {
        "init_objective": result.init_objective,
        "final_objective": result.final_objective,
        "relative_error": result.relative_error,
        "epochs": result.epochs,
        "seconds": result.seconds,
    }
    return layer
