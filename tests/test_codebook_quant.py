"""Tests of the LLM-Codebook quantizer against independent float64 references."""

from __future__ import annotations

import pytest
import torch

from lit_cb.layers import CodebookLinear
from lit_cb.quant.codebook import (
    CodebookConfig,
    _expand,
    codebook_quantize_tensors,
    damped_hessian,
    gptvq_assign,
    inverse_hessian_cholesky,
    layer_error,
    quantize_codebook,
    refine_codebook,
    relative_layer_error,
    weighted_error,
    weighted_kmeans,
)

# Small, fast settings for the synthetic layers below.
FAST = dict(in_group_size=2, nbits=5, kmeans_iters=25, codebook_update_steps=10)


def correlated_inputs(n: int, d: int, seed: int) -> torch.Tensor:
    """float64 activations with strongly correlated columns of very different magnitude."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(d, dtype=torch.float64) + 0.6 * torch.randn(d, d, generator=gen, dtype=torch.float64) / d**0.5
    col_scale = torch.exp(1.2 * torch.randn(d, generator=gen, dtype=torch.float64))
    return (torch.randn(n, d, generator=gen, dtype=torch.float64) @ mix) * col_scale


def synthetic_layer(seed: int, out_f: int = 48, in_f: int = 64, n: int = 2048):
    gen = torch.Generator().manual_seed(seed + 1000)
    x = correlated_inputs(n, in_f, seed)
    w = torch.randn(out_f, in_f, generator=gen) * torch.exp(0.3 * torch.randn(out_f, 1, generator=gen))
    h = (x.T @ x / n).float()
    return x, w, h


def true_objective(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """||X Wᵀ - X Ŵᵀ||² computed directly, in float64."""
    return float((x @ w.double().T - x @ w_hat.double().T).square().sum())


def reconstruct_f64(layer: CodebookLinear) -> torch.Tensor:
    """Dense weight from the stored tensors, by hand, in float64 (independent of layers.dequantize)."""
    nbits = layer.fmt.nbits_per_codebook
    idx = layer.codes.to(torch.int64)[..., 0] & ((1 << nbits) - 1)  # [out, ng]
    cb = layer.codebooks.detach().double()[0, :, 0, :]  # [K, g]
    s = layer.scales.detach().double().reshape(-1, 1)  # [out, 1]
    out_f, ng = idx.shape
    w = torch.empty(out_f, ng * cb.shape[1], dtype=torch.float64)
    for o in range(out_f):
        for i in range(ng):
            w[o, i * cb.shape[1] : (i + 1) * cb.shape[1]] = s[o, 0] * cb[idx[o, i]]
    return w


# ------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "field,value",
    [
        ("in_group_size", 3),
        ("in_group_size", 16),
        ("nbits", 1),
        ("nbits", 17),
        ("weighting", "hessian"),
        ("kmeans_iters", -1),
        ("init", "kmeans||"),
        ("damp", -0.1),
        ("gptvq_block_size", 6),
        ("gptvq_fit_weights", "hinv"),
        ("scale", "row_mean"),
        ("codebook_update_steps", -2),
        ("kmeans_max_points", 10),
    ],
)
def test_bad_config_raises_naming_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        CodebookConfig(**{field: value})


def test_config_dict_roundtrip() -> None:
    cfg = CodebookConfig(nbits=6, weighting="hessian_diag", scale=None)
    assert CodebookConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="nbit"):
        CodebookConfig.from_dict({"nbit": 8})


def test_default_bits_per_weight_576() -> None:
    fmt = CodebookConfig().make_format(576, 576, bias=False)
    bpw = fmt.bits_per_weight()
    # 8-bit codes per 4 weights, plus 256x4 fp16 centroids and 576 fp16 scales.
    assert bpw == pytest.approx(2 + (256 * 4 * 16 + 576 * 16) / 576**2)
    assert 2.0 < bpw < 2.1


# ------------------------------------------------------------------------------------- k-means


def test_weighted_kmeans_hand_checked() -> None:
    # Two obvious 1-D clusters; weighted means (0*1 + 1*1 + 2*2)/4 = 1.25 and (10*1 + 11*3)/4 = 10.75.
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0]])
    w = torch.tensor([[1.0], [1.0], [2.0], [1.0], [3.0]])
    res = weighted_kmeans(x, w, 2, iters=10, init="kmeans++", seed=0)
    order = res.centroids[:, 0].argsort()
    assert res.centroids[order, 0].tolist() == pytest.approx([1.25, 10.75])
    assert (res.codes == order[torch.tensor([0, 0, 0, 1, 1])]).all()
    # 1.25² + 0.25² + 2 * 0.75² + 0.75² + 3 * 0.25² = 3.5
    assert res.history[-1] == pytest.approx(3.5)


def test_weighted_kmeans_objective_non_increasing() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 4, generator=gen) * torch.tensor([3.0, 1.0, 0.3, 0.1])
    w = torch.exp(2 * torch.randn(4000, 4, generator=gen))
    res = weighted_kmeans(x, w, 32, iters=30, init="random", seed=1, tol=0.0)
    hist = torch.tensor(res.history, dtype=torch.float64)
    assert len(hist) > 10
    steps = hist[1:] - hist[:-1]
    assert (steps <= 1e-6 * hist[:-1]).all(), f"objective increased: {steps.max().item()}"
    assert hist[-1] < 0.8 * hist[0]  # and it actually made progress
    # The recorded objective is the real one.
    assert hist[-1].item() == pytest.approx(float(weighted_error(x, w, res.centroids, res.codes).double().sum()))


def test_weighted_beats_unweighted_on_weighted_error() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 2, generator=gen)
    w = torch.tensor([[100.0, 0.01]]).expand(3000, 2)  # only coordinate 0 matters
    weighted = weighted_kmeans(x, w, 8, iters=30, seed=0)
    plain = weighted_kmeans(x, torch.ones_like(w), 8, iters=30, seed=0)
    err_w = float(weighted_error(x, w, weighted.centroids, weighted.codes).sum())
    err_p = float(weighted_error(x, w, plain.centroids, plain.codes).sum())
    assert err_w < 0.3 * err_p


# ------------------------------------------------------------------------- layer objective


def test_layer_error_is_output_error() -> None:
    x, w, h = synthetic_layer(0, out_f=8, in_f=16, n=500)
    w_hat = w + 0.1 * torch.randn_like(w)
    ref = true_objective(x, w, w_hat) / x.shape[0]
    assert layer_error(w, w_hat, h) == pytest.approx(ref, rel=1e-4)
    assert relative_layer_error(w, w_hat, h) == pytest.approx(ref / (true_objective(x, w, 0 * w) / 500), rel=1e-4)


def test_hessian_aware_beats_unweighted_and_gptvq_beats_diag() -> None:
    errs: dict[str, float] = {"none": 0.0, "hessian_diag": 0.0, "gptvq": 0.0}
    for seed in range(3):
        x, w, h = synthetic_layer(seed)
        for weighting in errs:
            cfg = CodebookConfig(weighting=weighting, seed=seed, **FAST)
            layer = quantize_codebook(w, h, cfg, None)
            errs[weighting] += true_objective(x, w, reconstruct_f64(layer))
    assert errs["hessian_diag"] < 0.5 * errs["none"], errs
    assert errs["gptvq"] < 0.5 * errs["none"], errs
    assert errs["gptvq"] < 0.9 * errs["hessian_diag"], errs


# --------------------------------------------------------------------------- GPTVQ pass


def reference_gptvq_codes(wn: torch.Tensor, codebook: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Naive OBS in float64 with explicit inverses of the remaining sub-Hessian (no Cholesky).

    For each group J (in order) with remaining columns F = J ∪ R: pick the code minimising
    δ [H_FF⁻¹]_JJ⁻¹ δᵀ, then compensate the rest by -δ [H_FF⁻¹]_JJ⁻¹ [H_FF⁻¹]_JR.
    """
    w = wn.double().clone()
    cb = codebook.double()
    h = h.double()
    out_f, in_f = w.shape
    g = cb.shape[1]
    codes = torch.empty(out_f, in_f // g, dtype=torch.int64)
    for j in range(0, in_f, g):
        hinv_f = torch.linalg.inv(h[j:, j:])
        m = torch.linalg.inv(hinv_f[:g, :g])  # [g, g]
        delta = w[:, None, j : j + g] - cb[None]  # [out, K, g]
        cost = torch.einsum("okg,gh,okh->ok", delta, m, delta)
        c = cost.argmin(1)
        codes[:, j // g] = c
        d = w[:, j : j + g] - cb[c]  # [out, g]
        w[:, j + g :] -= d @ m @ hinv_f[:g, g:]
    return codes


@pytest.mark.parametrize("g,block", [(1, 8), (2, 8), (4, 32)])
def test_gptvq_assign_matches_naive_obs(g: int, block: int) -> None:
    x, w, h = synthetic_layer(5, out_f=16, in_f=32, n=400)
    hd = damped_hessian(h, 0.01)
    gen = torch.Generator().manual_seed(0)
    codebook = torch.randn(16, g, generator=gen) * w.std()
    codes = gptvq_assign(w, codebook, inverse_hessian_cholesky(hd), block)
    ref = reference_gptvq_codes(w, codebook, hd)
    assert (codes == ref).float().mean() > 0.98  # fp32 vs fp64 may flip a rare near-tie


# ---------------------------------------------------------------------- codebook refinement


def test_refine_codebook_reaches_least_squares_optimum() -> None:
    x, w, h = synthetic_layer(7, out_f=8, in_f=8, n=300)
    gen = torch.Generator().manual_seed(0)
    k, g = 4, 2
    codes = torch.randint(0, k, (8, 4), generator=gen)
    scales = torch.rand(8, generator=gen) + 0.5
    start = torch.randn(k, g, generator=gen)
    refined = refine_codebook(w, codes, scales, start, h, steps=40)
    # Exact optimum: vec(Ŵ) = A vec(C) is linear in C; minimise ||X (W - Ŵ)ᵀ||² by lstsq in float64.
    cols = []
    for e in range(k * g):
        basis = torch.zeros(k * g, dtype=torch.float64)
        basis[e] = 1
        w_e = _expand(basis.reshape(k, g), codes, scales.double())  # [out, in]
        cols.append((x @ w_e.T).reshape(-1))
    design = torch.stack(cols, dim=1)  # [n*out, K*g]
    target = (x @ w.double().T).reshape(-1)
    opt = torch.linalg.lstsq(design, target[:, None]).solution.reshape(k, g)
    err_opt = true_objective(x, w, _expand(opt, codes, scales.double()))
    err_ref = true_objective(x, w, _expand(refined.double(), codes, scales.double()))
    err_start = true_objective(x, w, _expand(start.double(), codes, scales.double()))
    assert err_ref <= err_opt * 1.01 + 1e-9
    assert err_ref < 0.9 * err_start


# ---------------------------------------------------------------------------- the layer


@pytest.mark.parametrize("weighting", ["none", "hessian_diag", "gptvq"])
def test_layer_forward_matches_float64_reconstruction(weighting: str) -> None:
    x, w, h = synthetic_layer(3, out_f=24, in_f=32, n=300)
    bias = torch.randn(24)
    cfg = CodebookConfig(weighting=weighting, scale="row_max", **FAST)
    layer = quantize_codebook(w, h, cfg, bias)
    assert isinstance(layer, CodebookLinear)
    assert layer.codebooks.shape == (1, 32, 1, 2) and layer.codebooks.dtype == torch.float16
    assert layer.scales.shape == (24, 1, 1, 1) and layer.scales.dtype == torch.float16
    assert layer.codes.shape == (24, 16, 1)
    w_hat = reconstruct_f64(layer)
    inp = torch.randn(5, 32)
    ref = inp.double() @ w_hat.T + bias.half().double()
    out = layer(inp)
    assert torch.allclose(out.double(), ref, rtol=2e-3, atol=2e-3 * ref.abs().max().item())
    # The stored tensors are what the quantizer computed (no loss in packing).
    res = codebook_quantize_tensors(w, h, cfg)
    assert torch.equal(layer.codes[..., 0].long(), res.codes)
    assert torch.allclose(w_hat.float(), _expand(res.codebook, res.codes, res.scales), rtol=1e-6, atol=1e-7)


def test_subsampled_fit_records_monotone_history_and_quantizes_all() -> None:
    x, w, h = synthetic_layer(2, out_f=64, in_f=64, n=400)  # 2048 vectors of g=2
    cfg = CodebookConfig(weighting="hessian_diag", kmeans_max_points=512, **FAST)
    res = codebook_quantize_tensors(w, h, cfg)
    assert res.codes.shape == (64, 32)
    assert relative_layer_error(w, _expand(res.codebook, res.codes, res.scales), h) < 0.2
