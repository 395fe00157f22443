"""compression.row_weighting="fisher": each codebook fits the Fisher-weighted objective sum_o F_o (ΔW H ΔWᵀ)_oo.

Checked against a dense float64 solve of the weighted normal equations, the identity of unit weights,
the float model's Fisher (kept in the run folder), and an interrupted compression that resumes to the
same model."""

from __future__ import annotations

import pytest
import torch

from lit_cb import sensitivity
from lit_cb.compress import CompressionConfig, _all_targets, compress_model
from lit_cb.configs.codebook import CodebookConfig
from lit_cb.quant import registry
from lit_cb.quant.codebook import (
    ROW_WEIGHT_FLOOR,
    _expand,
    codebook_quantize_tensors,
    normalised_row_weights,
    refine_codebook,
)
from lit_cb.quant.objective import fisher_layer_error

from .conftest import tiny_llama

BASE = {"in_group_size": 4, "nbits": 3, "kmeans_iters": 3, "codebook_update_steps": 2}


def _windows(n=4, seq=12, vocab=512, seed=0):
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def _layer(out_f=32, in_f=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    x = torch.randn(256, in_f, generator=g) * torch.linspace(0.2, 2.0, in_f)
    return w, x.T @ x / x.shape[0]


def test_unit_and_constant_row_weights_change_nothing():
    """Only the weights' shape matters: ones, or any constant, give the unweighted result bit for bit."""
    w, h = _layer()
    cfg = CodebookConfig(**BASE)
    plain = codebook_quantize_tensors(w, h, cfg)
    for rows in (torch.ones(32), torch.full((32,), 7.0)):
        got = codebook_quantize_tensors(w, h, cfg, rows)
        assert torch.equal(got.codes, plain.codes)
        assert torch.equal(got.codebook, plain.codebook)
        assert torch.equal(got.scales, plain.scales)


def test_refined_codebook_solves_the_row_weighted_normal_equations():
    """With the codes fixed the weighted objective is quadratic in the centroids: K·g conjugate-gradient
    steps reach the float64 least-squares solution (up to the fp16 rounding of what is stored)."""
    gen = torch.Generator().manual_seed(1)
    out_f, in_f, k, gs = 12, 8, 4, 2
    w, h = _layer(out_f, in_f, seed=1)
    codes = torch.randint(0, k, (out_f, in_f // gs), generator=gen)
    codes[0, :k] = torch.arange(k)  # every centroid used
    scales = (torch.rand(out_f, generator=gen) + 0.5).half().float()
    rows = torch.rand(out_f, generator=gen, dtype=torch.float64) ** 3 * 50 + 1e-3
    start = torch.randn(k, gs, generator=gen).half().float()
    got = refine_codebook(w, codes, scales, start, h, steps=4 * k * gs, row_weights=rows.float())
    # Reference: Ŵ is linear in vec(C); build its [out*in, K*g] design matrix and solve in float64.
    design = torch.zeros(out_f * in_f, k * gs, dtype=torch.float64)
    for o in range(out_f):
        for grp in range(in_f // gs):
            for j in range(gs):
                design[o * in_f + grp * gs + j, codes[o, grp] * gs + j] = float(scales[o])
    metric = torch.kron(torch.diag(rows), h.double())  # sum_o r_o δ_o H δ_oᵀ on vec(ΔW)
    a = design.T @ metric @ design
    b = design.T @ metric @ w.double().reshape(-1)
    best = torch.linalg.solve(a, b).reshape(k, gs)
    torch.testing.assert_close(got.double(), best, rtol=2e-3, atol=2e-3)

    def objective(c):
        return fisher_layer_error(w, _expand(c.float(), codes, scales), h, rows)

    assert objective(got) <= objective(start)
    assert objective(got) == pytest.approx(objective(best), rel=1e-3)


def test_weighting_rows_lowers_their_weighted_error():
    """Four rows carrying almost all the weight: the codebook fitted for them leaves them less error than
    the unweighted codebook does, measured by the dense float64 Fisher-weighted error."""
    w, h = _layer(out_f=64, in_f=32, seed=2)
    # The heavy rows hold a pattern the other rows lack, so four centroids cannot serve both well.
    w[:4] = 0.3 * w[:4] + torch.tensor([3.0, -3.0, 2.0, -1.0]).repeat(8)
    rows = torch.full((64,), 0.01)
    rows[:4] = 100.0
    cfg = CodebookConfig(**{**BASE, "nbits": 2, "kmeans_iters": 20})
    errs = {}
    for name, r in (("plain", None), ("weighted", rows)):
        res = codebook_quantize_tensors(w, h, cfg, r)
        errs[name] = fisher_layer_error(w, _expand(res.codebook, res.codes, res.scales), h, rows)
    assert errs["weighted"] < 0.7 * errs["plain"], errs  # 0.35-0.5x over seeds 0-3


def test_row_weights_are_normalised_floored_and_checked():
    r = normalised_row_weights(torch.tensor([0.0, 1.0, 3.0, 4.0]), 4)
    torch.testing.assert_close(r, torch.tensor([ROW_WEIGHT_FLOOR, 0.5, 1.5, 2.0]))
    with pytest.raises(ValueError, match="3 entries; the layer has 4 output rows"):
        normalised_row_weights(torch.ones(3), 4)
    for bad in (torch.tensor([1.0, -1.0]), torch.zeros(2), torch.tensor([1.0, float("nan")])):
        with pytest.raises(ValueError, match="finite, >= 0 and not all zero"):
            normalised_row_weights(bad, 2)


def test_bad_row_weighting_is_refused_before_any_work():
    with pytest.raises(ValueError, match=r"row_weighting='hessian'; allowed: \['none', 'fisher'\]"):
        CompressionConfig(row_weighting="hessian")
    with pytest.raises(ValueError, match=r"row_weighting='fisher' needs .*method='aqlm', allowed: \['codebook'\]"):
        CompressionConfig(method="aqlm", row_weighting="fisher")
    # the default is left out of what blocks record, so runs made before the key existed still resume
    assert "row_weighting" not in CompressionConfig(method_config=BASE).made_with()
    assert CompressionConfig(method_config=BASE, row_weighting="fisher").made_with()["row_weighting"] == "fisher"


def test_fisher_row_weighted_compression_keeps_its_fisher_and_resumes_to_the_same_model(tmp_path, monkeypatch):
    cfg = CompressionConfig(method="codebook", method_config=BASE, row_weighting="fisher")
    windows = _windows()
    full = tiny_llama(num_layers=3)
    reference = tiny_llama(num_layers=3)
    expect = sensitivity.output_fisher(reference, windows, _all_targets(reference, cfg.targets), torch.device("cpu"))
    compress_model(full, windows, cfg, device="cpu", progress=False, resume_dir=tmp_path / "a")
    from safetensors.torch import load_file

    kept = load_file(str(tmp_path / "a" / sensitivity.FISHER_FILE))
    assert sorted(kept) == sorted(expect) and len(kept) == 21
    for n in expect:
        torch.testing.assert_close(kept[n], expect[n].cpu(), rtol=0, atol=0)

    # The weights make a difference: the same compression without them gives other layers.
    plain = tiny_llama(num_layers=3)
    compress_model(
        plain, windows, CompressionConfig(method="codebook", method_config=BASE), device="cpu", progress=False
    )
    assert any(
        not torch.equal(a, b) for a, b in zip(full.state_dict().values(), plain.state_dict().values(), strict=True)
    )

    interrupted = tiny_llama(num_layers=3)
    calls = {"n": 0}
    original = registry.quantize_linear

    def failing(layer, hessian, config, row_weights=None):
        calls["n"] += 1
        if calls["n"] > 9:  # dies inside block 1 (7 linears a block)
            raise KeyboardInterrupt
        return original(layer, hessian, config, row_weights)

    monkeypatch.setattr(registry, "quantize_linear", failing)
    with pytest.raises(KeyboardInterrupt):
        compress_model(interrupted, windows, cfg, device="cpu", resume_dir=tmp_path / "b", progress=False)
    monkeypatch.setattr(registry, "quantize_linear", original)
    assert (tmp_path / "b" / sensitivity.FISHER_FILE).is_file()

    # The resume reads the kept Fisher, not the (now partly compressed) model's.
    monkeypatch.setattr(sensitivity, "output_fisher", lambda *a, **k: pytest.fail("Fisher measured again on resume"))
    resumed = tiny_llama(num_layers=3)
    report = compress_model(resumed, windows, cfg, device="cpu", resume_dir=tmp_path / "b", progress=False)
    assert len(report.layers) == 21
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)


def test_a_truncated_fisher_file_is_refused_naming_it(tmp_path):
    cfg = CompressionConfig(method="codebook", method_config=BASE, row_weighting="fisher")
    (tmp_path / sensitivity.FISHER_FILE).write_bytes(b"\x00" * 7)
    with pytest.raises(ValueError, match="output_fisher.safetensors is corrupt"):
        compress_model(tiny_llama(num_layers=1), _windows(), cfg, device="cpu", progress=False, resume_dir=tmp_path)
