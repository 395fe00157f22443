"""bench/shared_codebook_probe.py against hand-checked cases: a shared codebook that holds every group of a
layer reproduces it exactly, the error it reports is what dense float64 outputs say, and the pool gives
every layer the same mean k-means weight in proportion to its size."""

from __future__ import annotations

import torch

from .conftest import load_script


def _probe():
    return load_script("bench/shared_codebook_probe.py")


def _layer(out_f: int, in_f: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8 * in_f, in_f, generator=g, dtype=torch.float64)
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    return w, x, x.T @ x / x.shape[0]


def test_a_codebook_holding_every_group_reproduces_the_layer():
    from lit_cb.quant.codebook import row_scales

    probe = _probe()
    w, _, h = _layer(6, 16, 0)
    w = w.float().half().float()  # fp16-exact, as a stored codebook is
    scales = row_scales(w, "row_norm")
    groups = (w / scales[:, None]).reshape(-1, 8)
    # the codebook is fp16; the normalised groups round-trip through it exactly only if they are fp16 too
    codebook = torch.cat([groups.half().float(), torch.randn(5, 8)])
    w_hat = probe.shared_assign(w, h, codebook, damp=0.01)
    expect = (groups.half().float().reshape(6, 2, 8) * scales[:, None, None]).reshape(6, 16)
    assert torch.allclose(w_hat, expect, atol=1e-6)


def test_relative_error_is_the_dense_output_error():
    probe = _probe()
    w, x, h = _layer(5, 16, 1)
    w_hat = w + 0.05 * torch.randn(5, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    dense = ((x @ (w - w_hat).T).square().sum() / (x @ w.T).square().sum()).item()
    assert abs(probe.relative_error(w, w_hat, h) - dense) < 1e-12 * max(1.0, dense)


def test_pool_draws_by_size_and_weights_every_layer_alike():
    probe = _probe()
    wa, _, ha = _layer(8, 32, 3)
    wb, _, hb = _layer(4, 16, 4)
    hb = hb * 1000.0  # a layer with much larger inputs must not dominate the pooled objective
    x, vw = probe.pool_vectors({"a": wa, "b": wb}, {"a": ha, "b": hb}, g=8, size=20, damp=0.01, seed=0)
    assert x.shape == vw.shape == (20, 8)  # 256 and 64 weights: 16 and 4 groups of 8 drawn
    assert abs(vw[:16].mean().item() - vw[16:].mean().item()) < 1.0  # both near their layer mean 1, not 1000x apart
