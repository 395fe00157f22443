"""The trellis input rotation's Triton kernels (lit_cb.kernels.rotation) against the float64 rotation, on CPU
under the Triton interpreter (the GPU timing is in bench/trellis_kernel_bench.py)."""

from __future__ import annotations

import pytest
import torch

from lit_cb.kernels.dispatch import interpreter_on_cpu
from lit_cb.trellis import InputRotation, TrellisFormat, TrellisLinear

from .conftest import interpreted_module

KR = interpreted_module("lit_cb.kernels.rotation", "_signs_hadamard_kernel")


# one group; 3 x 16; 5 x 8; 9 x 64; p = 2; 43 x 16 (LLaMA-7B's 11008 = 43 x 256, narrower); 63 x 2 (the most groups)
@pytest.mark.parametrize("n", [64, 48, 40, 576, 2, 688, 126])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_rotation_is_the_float64_rotation(n, dtype):
    rot = InputRotation(n, seed=n)
    x = torch.randn(2, 3, n, generator=torch.Generator().manual_seed(n)).to(dtype)
    ref = rot.rotate(x.double())  # the PyTorch path (Kronecker factors), itself tested against the dense matrix
    with interpreter_on_cpu():
        got = KR.rotate(x, rot)
    assert got.dtype == dtype and got.shape == x.shape
    if dtype == torch.float32:
        assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-5)
    else:  # computed in float32, rounded once to dtype: within one rounding of the exact value
        eps = torch.finfo(dtype).eps
        assert torch.all((got.double() - ref).abs() <= eps * ref.abs() + 1e-5)


def test_refused_where_the_kernels_do_not_apply(monkeypatch):
    rot = InputRotation(64, seed=0)
    with interpreter_on_cpu():
        assert KR.supports(rot, torch.zeros(1, 64))
        monkeypatch.setattr(KR, "HAS_TRITON_FEATURES", False)  # an older Triton: the rotation stays in PyTorch
        assert not KR.supports(rot, torch.zeros(1, 64))
    monkeypatch.undo()
    assert not KR.supports(rot, torch.zeros(1, 64))  # a CPU tensor outside the interpreter context
    with interpreter_on_cpu():
        assert not KR.supports(rot, torch.zeros(1, 64, dtype=torch.int32))
        assert not KR.supports(rot, torch.zeros(1, 32))
        with pytest.raises(ValueError, match="do not take"):
            KR.rotate(torch.zeros(1, 32), rot)


def test_layer_rotates_through_the_kernel_without_autograd_and_matches_the_reference():
    fmt = TrellisFormat(48, 32, tile_rows=16, tile_cols=8)
    layer = TrellisLinear(fmt, dtype=torch.float32)
    layer.codes.random_(0, 4)
    x = torch.randn(5, 48)
    calls = []
    original = KR.rotate
    try:
        KR.rotate = lambda *a: calls.append(1) or original(*a)
        with torch.no_grad():
            ref = layer(x)  # outside the interpreter context: the PyTorch rotation
            layer.rotation().last_rotated = None
            with interpreter_on_cpu():
                got = layer(x)
    finally:
        KR.rotate = original
    assert calls == [1]
    assert torch.allclose(got, ref, atol=1e-4)
