"""compression.sensitivity_weighting="fisher": the per-output Fisher against autograd's own gradients, the
Fisher-weighted error against dense float64 outputs, and a mixed-bits compression that uses it and meets the
budget exactly."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

from lit_cb import sensitivity
from lit_cb.architectures import DEFAULT_TARGETS
from lit_cb.compress import CompressionConfig, bits_per_weight, compress_model
from lit_cb.quant.allocation import budget_bits
from lit_cb.quant.objective import fisher_layer_error, layer_error

from .conftest import tiny_llama

BASE = {"in_group_size": 4, "nbits": 4, "kmeans_iters": 3, "codebook_update_steps": 2}
OPTIONS = [{"nbits": 3}, {"nbits": 4}, {"nbits": 5}]


def _windows(n=3, seq=10, vocab=512, seed=0):
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def _targets(model) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.search(DEFAULT_TARGETS, n)}


def test_output_fisher_is_the_mean_squared_gradient_autograd_gives():
    model = tiny_llama(num_layers=2)
    windows = _windows()
    targets = _targets(model)
    got = sensitivity.output_fisher(model, windows, targets, torch.device("cpu"))
    # Reference: capture each output tensor and ask autograd for d(summed CE)/d(output) directly.
    expect = {n: torch.zeros(m.out_features, dtype=torch.float64) for n, m in targets.items()}
    for w in windows:
        outs: dict[str, torch.Tensor] = {}
        hooks = [
            m.register_forward_hook(lambda _m, _a, o, n=n, outs=outs: outs.__setitem__(n, o))
            for n, m in targets.items()
        ]
        with torch.enable_grad():
            logits = model(w[None]).logits.float()
            loss = nn.functional.cross_entropy(logits[0, :-1], w[1:], reduction="sum")
            grads = torch.autograd.grad(loss, [outs[n] for n in targets])
        for h in hooks:
            h.remove()
        for n, g in zip(targets, grads, strict=True):
            expect[n] += g.double().reshape(-1, g.shape[-1]).square().sum(0)
    for n in targets:
        ref = expect[n] / windows.numel()
        assert torch.allclose(got[n], ref, rtol=1e-5, atol=1e-12), n
        assert float(ref.sum()) > 0, n
    # the parameters' requires_grad flags are as before (all trainable in a fresh model)
    assert all(p.requires_grad for p in model.parameters())


def test_fisher_layer_error_is_the_weighted_dense_output_error():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=g, dtype=torch.float64)
    w = torch.randn(5, 12, generator=g, dtype=torch.float64)
    w_hat = w + 0.1 * torch.randn(5, 12, generator=g, dtype=torch.float64)
    h = x.T @ x / x.shape[0]
    f = torch.rand(5, generator=g, dtype=torch.float64)
    dense = float((((x @ (w - w_hat).T) ** 2).mean(0) * f).sum())  # sum_o F_o mean_t (Δy_to)²
    assert fisher_layer_error(w, w_hat, h, f) == pytest.approx(dense, rel=1e-12)
    assert fisher_layer_error(w, w_hat, h, torch.ones(5)) == pytest.approx(layer_error(w, w_hat, h), rel=1e-6)


def test_option_errors_with_a_unit_fisher_are_the_absolute_errors():
    """All rows, F = 1: the Fisher-weighted option errors are the relative ones times tr(W H Wᵀ)."""
    layer = nn.Linear(16, 8, bias=False)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    h = x.T @ x / 64
    opts = CompressionConfig(
        method="codebook", method_config=BASE, bit_budget=3.5, bit_options=OPTIONS
    ).bit_option_settings()
    rel = sensitivity.measure_option_errors(layer, h, opts, None, 0, torch.device("cpu"))
    fis = sensitivity.measure_option_errors(layer, h, opts, None, 0, torch.device("cpu"), torch.ones(8))
    energy = layer_error(layer.weight.detach(), torch.zeros(8, 16), h)
    for r, f in zip(rel, fis, strict=True):
        assert f == pytest.approx(r * energy, rel=1e-5)


def test_fisher_weighted_mixed_bits_meet_the_budget(tmp_path):
    windows = _windows(n=4, seq=12)
    uniform = tiny_llama(num_layers=1)
    compress_model(
        uniform, windows, CompressionConfig(method="codebook", method_config=BASE), device="cpu", progress=False
    )
    budget = bits_per_weight(uniform)["compressed_linears"]
    cfg = CompressionConfig(
        method="codebook", method_config=BASE, bit_budget=budget, bit_options=OPTIONS, sensitivity_weighting="fisher"
    )
    mixed = tiny_llama(num_layers=1)
    rep = compress_model(mixed, windows, cfg, device="cpu", progress=False, resume_dir=tmp_path / "blocks")
    assert bits_per_weight(mixed)["compressed_linears"] <= budget + 1e-12
    weights = sum(m.in_features * m.out_features for m in _targets(tiny_llama(num_layers=1)).values())
    assert rep.bit_allocation["allocation"]["total_bits"] <= budget_bits(budget, weights)  # exact integer bits
    record = json.loads((tmp_path / "blocks" / sensitivity.ALLOCATION_FILE).read_text())
    assert record["weighting"] == "fisher" and "Fisher-weighted" in sensitivity.allocation_summary(record)
    assert record["config"]["sensitivity_weighting"] == "fisher"
    # the relative weighting (the default) is left out of what blocks record, so older runs still resume
    assert "sensitivity_weighting" not in CompressionConfig(method="codebook", method_config=BASE).made_with()


def test_an_unknown_weighting_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match=r"sensitivity_weighting='hessian'.*\['relative', 'fisher'\]"):
        CompressionConfig(sensitivity_weighting="hessian")


def test_a_row_subsample_is_scaled_to_the_whole_layer():
    """Identical rows: the sampled rows' Fisher-weighted error, scaled by out / rows, is the whole layer's."""
    row = torch.randn(1, 64, generator=torch.Generator().manual_seed(2))
    layer = nn.Linear(64, 256, bias=False)
    layer.weight.data.copy_(row.expand(256, 64))
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(3))
    h = x.T @ x / 256
    opts = CompressionConfig(
        method="codebook", method_config=BASE, bit_budget=3.5, bit_options=OPTIONS
    ).bit_option_settings()
    assert sensitivity._sample_rows(layer, opts, 8, 0) is not None  # a subsample is measured, not every row
    rel = sensitivity.measure_option_errors(layer, h, opts, 8, 0, torch.device("cpu"))
    fis = sensitivity.measure_option_errors(layer, h, opts, 8, 0, torch.device("cpu"), torch.ones(256))
    energy = layer_error(layer.weight.detach(), torch.zeros(256, 64), h)  # all 256 rows
    for r, f in zip(rel, fis, strict=True):
        assert f == pytest.approx(r * energy, rel=1e-4)
