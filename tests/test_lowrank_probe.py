"""bench/lowrank_probe.py's error share against identities: an exactly rank-r error is removed by a
rank-r correction, H = I makes the weighted and the plain SVD agree, and the weighted correction is
never worse than the plain one in the H norm (it is the optimum there)."""

from __future__ import annotations

import torch

from .conftest import load_script


def _probe():
    return load_script("bench/lowrank_probe.py")


def _hessian(n: int, seed: int) -> torch.Tensor:
    x = torch.randn(4 * n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x[:, 0] *= 30  # an outlier input channel, as real activations have
    return x.T @ x / x.shape[0]


def test_an_exactly_rank_two_error_is_removed_by_rank_two():
    g = torch.Generator().manual_seed(0)
    dw = torch.randn(24, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 16, generator=g, dtype=torch.float64)
    left = _probe().error_left(dw, _hessian(16, 1), ranks=(1, 2, 4))
    assert left["weighted"][1] > 1e-4  # the second direction is still there at rank 1
    assert left["weighted"][2] < 1e-20 and left["weighted"][4] < 1e-20
    assert left["plain_svd"][2] < 1e-20  # the plain SVD removes a rank-2 error too


def test_identity_hessian_makes_both_the_same_and_weighted_is_never_worse():
    probe = _probe()
    dw = torch.randn(20, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    same = probe.error_left(dw, torch.eye(12, dtype=torch.float64), ranks=(1, 3, 6), damp=0.0)
    for r in (1, 3, 6):
        assert abs(same["weighted"][r] - same["plain_svd"][r]) < 1e-12
    skewed = probe.error_left(dw, _hessian(12, 3), ranks=(1, 3, 6))
    for r in (1, 3, 6):
        assert skewed["weighted"][r] <= skewed["plain_svd"][r] + 1e-12
    assert skewed["weighted"][1] < skewed["plain_svd"][1] - 0.01  # the outlier channel makes them differ
    # Eckart-Young by hand for rank 1: the share left is 1 - sigma_1^2 / sum sigma^2 of dW L
    from lit_cb.quant.objective import damped_hessian

    sv = torch.linalg.svdvals(dw @ torch.linalg.cholesky(damped_hessian(_hessian(12, 3), 0.01)))
    assert abs(skewed["weighted"][1] - (1 - sv[0] ** 2 / (sv**2).sum())) < 1e-12
