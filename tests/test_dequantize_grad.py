"""The sort-free codebook gradient of :func:`lit_cb.layers.dequantize_weight` against float64
autograd through plain indexing, and its cache against in-place code changes."""

import copy

import pytest
import torch

from lit_cb.layers import _SEGMENT_CACHE, dequantize_weight, pack_codes


def _reference(idx: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    groups = sum(codebooks[m][idx[..., m]] for m in range(idx.shape[-1])) * scales
    og, ig, osz, isz = groups.shape
    return groups.permute(0, 2, 1, 3).reshape(og * osz, ig * isz)


@pytest.mark.parametrize(
    "og,ig,num_codebooks,nbits,osz,isz",
    [(6, 5, 1, 4, 1, 4), (4, 3, 2, 8, 1, 8), (3, 4, 2, 10, 2, 2), (5, 2, 1, 16, 1, 4)],
)
def test_gradient_matches_float64_indexing(og, ig, num_codebooks, nbits, osz, isz):
    gen = torch.Generator().manual_seed(nbits)
    idx = torch.randint(0, 2**nbits, (og, ig, num_codebooks), generator=gen)
    idx[0, 0, 0] = 2**nbits - 1  # the top code (wrapped int16 for B=16)
    codes = pack_codes(idx, nbits)
    cb = torch.randn(num_codebooks, 2**nbits, osz, isz, dtype=torch.float64, generator=gen, requires_grad=True)
    sc = torch.rand(og, 1, 1, 1, dtype=torch.float64, generator=gen, requires_grad=True)
    g = torch.randn(og * osz, ig * isz, dtype=torch.float64, generator=gen)

    w = dequantize_weight(codes, cb, sc, nbits)
    (w * g).sum().backward()
    got_cb, got_sc = cb.grad.clone(), sc.grad.clone()
    cb.grad = sc.grad = None
    ref = _reference(idx, cb, sc)
    (ref * g).sum().backward()

    assert torch.equal(w, ref)
    torch.testing.assert_close(got_cb, cb.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(got_sc, sc.grad, rtol=0, atol=1e-12)
    # Only codes that occur get a gradient: the others are exactly zero.
    unused = torch.ones(2**nbits, dtype=torch.bool)
    unused[idx[..., 0].flatten()] = False
    assert torch.all(got_cb[0][unused] == 0)


def test_in_place_code_change_invalidates_the_cache():
    gen = torch.Generator().manual_seed(0)
    codes = pack_codes(torch.randint(0, 16, (4, 3, 1), generator=gen), 4)
    cb = torch.randn(1, 16, 1, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    sc = torch.ones(4, 1, 1, 1, dtype=torch.float64, requires_grad=True)
    dequantize_weight(codes, cb, sc, 4).sum().backward()
    new = torch.randint(0, 16, (4, 3, 1), generator=gen)
    codes.copy_(pack_codes(new, 4))  # a V-step's in-place update
    cb.grad = None
    w = dequantize_weight(codes, cb, sc, 4)
    w.sum().backward()
    expected = torch.zeros(16, dtype=torch.float64)
    expected.index_add_(0, new.flatten(), torch.ones(new.numel(), dtype=torch.float64))
    assert torch.equal(w, _reference(new, cb.detach(), sc.detach()))
    torch.testing.assert_close(cb.grad[0, :, 0, 0], expected)


def test_cache_is_not_carried_by_copies_and_is_freed():
    codes = pack_codes(torch.randint(0, 16, (4, 3, 1)), 4)
    cb = torch.randn(1, 16, 1, 4, requires_grad=True)
    dequantize_weight(codes, cb, torch.ones(4, 1, 1, 1), 4)
    assert id(codes) in _SEGMENT_CACHE
    assert not hasattr(copy.deepcopy(codes), "__dict__") or not copy.deepcopy(codes).__dict__
    key = id(codes)
    del codes
    assert key not in _SEGMENT_CACHE
