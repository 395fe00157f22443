"""bench/rotation_probe.py against identities: its rotations are orthogonal, a rotated layer computes the
same outputs, the error measure is invariant under rotating the weight and its approximation alike, and the
codebook method's error on a rotated layer is what a dense float64 computation of the layer's outputs says."""

from __future__ import annotations

import torch

from .conftest import load_script


def _probe():
    return load_script("bench/rotation_probe.py")


def _layer(out_f: int, in_f: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8 * in_f, in_f, generator=g, dtype=torch.float64)
    x[:, 3] *= 20  # an outlier input channel
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    return w, x, x.T @ x / x.shape[0]


def test_haar_rotations_are_orthogonal_and_seeded():
    probe = _probe()
    q = probe.haar_orthogonal(24, 5)
    assert torch.allclose(q.T @ q, torch.eye(24, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, probe.haar_orthogonal(24, 5)) and not torch.equal(q, probe.haar_orthogonal(24, 6))


def test_a_rotated_layer_computes_the_same_outputs_and_the_error_measure_is_invariant():
    probe = _probe()
    w, x, h = _layer(12, 16, 0)
    q_in, q_out = probe.haar_orthogonal(16, 1), probe.haar_orthogonal(12, 2)
    w_rot, h_rot = probe.rotate(w, h, q_in, q_out)
    # the rotated layer fed x Q_in and un-rotated at its output gives x Wᵀ
    assert torch.allclose((x @ q_in) @ w_rot.T @ q_out.T, x @ w.T, atol=1e-9)
    assert torch.allclose(h_rot, (x @ q_in).T @ (x @ q_in) / x.shape[0], atol=1e-9)
    w_hat = w + 0.01 * torch.randn(12, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    w_hat_rot, _ = probe.rotate(w_hat, h, q_in, q_out)
    assert abs(probe.relative_error(w, w_hat, h) - probe.relative_error(w_rot, w_hat_rot, h_rot)) < 1e-12
    # against the layer's outputs computed densely: ||X ΔWᵀ||² / ||X Wᵀ||²
    dense = float(((x @ (w - w_hat).T) ** 2).sum() / ((x @ w.T) ** 2).sum())
    assert abs(probe.relative_error(w, w_hat, h) - dense) < 1e-12


def test_probe_layer_reports_each_rotation_against_the_plain_codebook_error():
    from lit_cb.configs.codebook import CodebookConfig

    probe = _probe()
    w, _, h = _layer(16, 32, 4)
    cfg = CodebookConfig(in_group_size=4, nbits=4, weighting="gptvq", kmeans_iters=3)
    row = probe.probe_layer(w.float(), h, cfg, seeds=[0, 1])
    assert 0 < row["relative_error"] < 1
    for variant in probe.VARIANTS:
        entry = row["variants"][variant]
        assert len(entry["ratio"]) == 2
        for err, ratio in zip(entry["relative_error"], entry["ratio"], strict=True):
            assert abs(ratio - err / row["relative_error"]) < 1e-12 and 0 < err < 1
    # the plain error is the codebook method's, measured on the dense outputs
    assert abs(row["relative_error"] - probe.relative_error(w, probe.quantize(w, h, cfg), h)) < 1e-9
