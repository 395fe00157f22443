"""The trellis decode kernel (lit_cb.kernels.trellis) against float64 references, on CPU under the Triton
interpreter (CI has no GPU; the GPU check and timings are in bench/trellis_kernel_bench.py)."""

from __future__ import annotations

import pytest
import torch

from lit_cb.kernels.dispatch import interpreter_on_cpu
from lit_cb.trellis import TrellisFormat, TrellisLinear, symbols_to_states

from .conftest import interpreted_module
from .test_trellis import _random_walks

KT = interpreted_module("lit_cb.kernels.trellis", "_trellis_gemv_kernel")


def _layer(fmt: TrellisFormat, seed: int) -> TrellisLinear:
    walks = _random_walks(fmt.num_tiles, fmt.steps, fmt.state_bits, fmt.bits_per_step, seed)
    gen = torch.Generator().manual_seed(seed)
    scales = torch.rand(fmt.out_features, generator=gen) + 0.5
    bias = torch.randn(fmt.out_features, generator=gen) if fmt.bias else None
    return TrellisLinear.from_walks(fmt, walks, scales, bias, dtype=torch.float32)


@pytest.mark.parametrize(("state_bits", "k"), [(12, 2), (16, 4), (8, 1)])
def test_packed_words_hold_each_state_as_the_window_the_kernel_reads(state_bits, k):
    fmt = TrellisFormat(16, 32, state_bits=state_bits, bits_per_step=k, tile_rows=8, tile_cols=8)
    layer = _layer(fmt, seed=state_bits)
    words = KT.pack_tile_words(layer.codes, fmt)
    states = symbols_to_states(layer.codes, state_bits, k)
    per_word = 32 // k
    for tile in (0, fmt.num_tiles - 1):
        w = [int(v) & 0xFFFFFFFF for v in words[tile]]
        for t in range(fmt.steps):
            q, s = divmod(t, per_word)
            window = ((w[q] << 32 | w[q + 1]) >> (64 - state_bits - k * s)) & (2**state_bits - 1)
            assert window == int(states[tile, t])


@pytest.mark.parametrize("tokens", [1, 3, 16])
@pytest.mark.parametrize("split_k", [1, 2, 5])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gemv_matches_the_float64_product(tokens, split_k, dtype):
    fmt = TrellisFormat(40, 64, tile_rows=16, tile_cols=8, rotation_seed=1)
    layer = _layer(fmt, seed=tokens * 7 + split_k)
    x = torch.randn(tokens, 40, generator=torch.Generator().manual_seed(split_k)).to(dtype)
    w = layer.dequantize_rotated().double()
    ref = x.double() @ w.T
    got = KT.trellis_gemv(x, KT.pack_tile_words(layer.codes, fmt), layer.scales, fmt, split_k=split_k)
    bound = 1e-5 * (x.double().abs() @ w.abs().T) + 1e-6  # fp32 accumulation of exact fp32 products
    assert torch.all((got.double() - ref).abs() <= bound)


def test_layer_forward_takes_the_kernel_and_agrees_with_the_reference_path():
    fmt = TrellisFormat(48, 32, tile_rows=16, tile_cols=8, bias=True)
    layer = _layer(fmt, seed=3)
    x = torch.randn(2, 5, 48)
    with torch.no_grad():
        ref = layer(x)  # CPU without the interpreter context: the dense reference path
        calls = []
        original = KT.trellis_gemv
        try:
            KT.trellis_gemv = lambda *a, **kw: calls.append(1) or original(*a, **kw)
            with interpreter_on_cpu():
                got = layer(x[:, :3])  # 6 tokens: the kernel
        finally:
            KT.trellis_gemv = original
    assert calls and torch.allclose(got, ref[:, :3], atol=1e-4)


def test_formats_the_kernel_cannot_read_are_refused_and_left_to_the_reference():
    fmt = TrellisFormat(24, 32, state_bits=12, bits_per_step=3, tile_rows=8, tile_cols=8)
    assert not KT.supports(fmt)
    with pytest.raises(ValueError, match="does not take"):
        KT.trellis_gemv(torch.zeros(1, 24), torch.zeros(1, 1, dtype=torch.int32), torch.ones(32), fmt)


@pytest.mark.parametrize(
    ("state_bits", "k", "tile_rows", "out_f"),
    # 1, 4 and 2 tile rows per word; 9 row tiles (masked); L14 / L16 walks of 64 x 8 (longer walks: fewer first states)
    [(16, 4, 8, 72), (8, 1, 16, 144), (12, 2, 32, 288), (14, 2, 64, 576), (16, 2, 64, 576)],
)
def test_gemv_matches_the_float64_product_for_other_walks_and_partial_programs(state_bits, k, tile_rows, out_f):
    fmt = TrellisFormat(32, out_f, state_bits=state_bits, bits_per_step=k, tile_rows=tile_rows, tile_cols=8)
    assert KT.supports(fmt) and fmt.out_features // fmt.tile_rows > KT.TILES_PER_PROGRAM
    layer = _layer(fmt, seed=k)
    x = torch.randn(10, 32, generator=torch.Generator().manual_seed(k))  # 10 tokens: two launches (8 + 2)
    w = layer.dequantize_rotated().double()
    ref = x.double() @ w.T
    got = KT.trellis_gemv(x, KT.pack_tile_words(layer.codes, fmt), layer.scales, fmt, split_k=3)
    bound = 1e-5 * (x.double().abs() @ w.abs().T) + 1e-6
    assert torch.all((got.double() - ref).abs() <= bound)


@pytest.mark.parametrize(("state_bits", "k", "tile_rows", "out_f"), [(16, 4, 8, 72), (8, 1, 16, 144), (14, 2, 64, 192)])
@pytest.mark.parametrize("tokens", [1, 7])
def test_tensor_core_kernel_matches_the_float64_product(state_bits, k, tile_rows, out_f, tokens):
    """The MMA kernel (fp16 only; two column blocks a step, so 5 blocks leave half a pair) against float64: the
    values are exact in fp16, so only the fp32 sums round."""
    fmt = TrellisFormat(40, out_f, state_bits=state_bits, bits_per_step=k, tile_rows=tile_rows, tile_cols=8)
    layer = _layer(fmt, seed=k + tokens)
    x = torch.randn(tokens, 40, generator=torch.Generator().manual_seed(tokens)).half()
    w = layer.dequantize_rotated().double()
    ref = x.double() @ w.T
    got = KT.trellis_gemv(x, KT.pack_tile_words(layer.codes, fmt), layer.scales, fmt, split_k=2, mma=True)
    bound = 1e-5 * (x.double().abs() @ w.abs().T) + 1e-6
    assert torch.all((got.double() - ref).abs() <= bound)
    with pytest.raises(ValueError, match="takes fp16"):
        KT.trellis_gemv(x.float(), KT.pack_tile_words(layer.codes, fmt), layer.scales, fmt, mma=True)


@pytest.mark.parametrize(
    ("state_bits", "k", "tile_rows", "out_f"),
    [(12, 2, 32, 288), (16, 4, 8, 72), (8, 1, 16, 48), (14, 2, 64, 192)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_device_dequantize_is_the_reference_weight(state_bits, k, tile_rows, out_f, dtype):
    fmt = TrellisFormat(24, out_f, state_bits=state_bits, bits_per_step=k, tile_rows=tile_rows, tile_cols=8)
    layer = _layer(fmt, seed=state_bits)
    ref = layer.dequantize_rotated().double()
    got = KT.trellis_dequantize(KT.pack_tile_words(layer.codes, fmt), layer.scales, fmt, dtype)
    assert got.dtype == dtype and got.shape == ref.shape
    assert torch.all((got.double() - ref).abs() <= torch.finfo(dtype).eps * ref.abs() + 1e-7)


def test_many_tokens_decode_the_weight_per_call_and_keep_no_float_copy():
    fmt = TrellisFormat(48, 32, tile_rows=16, tile_cols=8, bias=True)
    layer = _layer(fmt, seed=5)
    x = torch.randn(3, 9, 48)  # 27 tokens: more than the matvec kernels take
    with torch.no_grad():
        ref = x.double() @ layer.dequantize().double().T + layer.bias.double()
        layer.__dict__.pop("_unit_cache", None)
        with interpreter_on_cpu():
            got = layer(x)
    assert "_unit_cache" not in layer.__dict__  # the serving path decoded on the device, kept nothing
    assert torch.allclose(got.double(), ref, atol=1e-4)


@pytest.mark.parametrize("train_scales", [True, False])
def test_training_decodes_on_the_device_per_call_with_the_reference_gradients(train_scales):
    """With autograd, the kernel path (_DeviceDecodedLinear) decodes the weight in the forward and the backward and
    keeps no float copy; its output and the gradients of the input and the row scales equal the reference path's
    (which keeps the float32 decode). Frozen scales still pass the input's gradient on."""
    fmt = TrellisFormat(48, 32, tile_rows=16, tile_cols=8, bias=True)
    layers = [_layer(fmt, seed=9), _layer(fmt, seed=9)]
    x0 = torch.randn(2, 5, 48)
    results = []
    for layer, kernel in zip(layers, (False, True), strict=True):
        layer.scales.requires_grad_(train_scales)
        layer.__dict__.pop("_unit_cache", None)
        x = x0.clone().requires_grad_(True)
        with interpreter_on_cpu(kernel):
            out = layer(x)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        if kernel:
            assert "_unit_cache" not in layer.__dict__
        results.append((out.detach(), x.grad, layer.scales.grad))
    (ref_out, ref_gx, ref_gs), (got_out, got_gx, got_gs) = results
    assert torch.allclose(got_out, ref_out, atol=1e-5)
    assert torch.allclose(got_gx, ref_gx, atol=1e-5)
    if train_scales:
        assert torch.allclose(got_gs, ref_gs, rtol=1e-5, atol=1e-5)
    else:
        assert got_gs is None and ref_gs is None


def _parts_for_fusion() -> list[TrellisLinear]:
    """q/k/v-like trellis layers on one 48-wide input: different heights, one bias, two low-rank terms (one in
    8-bit slots), one rotation (same width and seed)."""
    parts = [
        _layer(TrellisFormat(48, 32, tile_rows=16, tile_cols=8, bias=True), seed=11),
        _layer(TrellisFormat(48, 16, tile_rows=16, tile_cols=8), seed=12),
        _layer(TrellisFormat(48, 48, tile_rows=16, tile_cols=8), seed=13),
    ]
    gen = torch.Generator().manual_seed(5)
    parts[0].add_low_rank(torch.randn(2, 48, generator=gen), torch.randn(32, 2, generator=gen) * 0.1)
    parts[2].add_low_rank(torch.randn(3, 48, generator=gen), torch.randn(48, 3, generator=gen) * 0.1)
    parts[2].round_low_rank(8)
    return parts


def test_fused_trellis_layer_is_its_parts_side_by_side_and_unfuses_exactly():
    """FusedTrellisLinear: its weight is the parts' float64 weights stacked (row tiles regrouped per column block),
    its output on the reference path and on the kernel (interpreter) the parts' outputs concatenated, and
    unfuse() gives back the parts' codes, scales, bias and low-rank terms bit for bit."""
    from lit_cb.fused import FusedTrellisLinear

    parts = _parts_for_fusion()
    fused = FusedTrellisLinear(parts)
    assert fused.part_sizes == [32, 16, 48] and fused.fmt.out_features == 96 and fused.fmt.bias
    want = torch.cat([p.dequantize_rotated().double() for p in parts])
    assert torch.equal(fused.dequantize_rotated().double(), want)
    x = torch.randn(3, 48)
    with torch.no_grad():
        ref = torch.cat([p(x) for p in parts], dim=-1)
        assert torch.allclose(fused(x), ref, atol=1e-5)
        with interpreter_on_cpu():
            assert torch.allclose(fused(x[:2]), ref[:2], atol=1e-4)  # the decode kernel on the fused tiles
    for part, back in zip(parts, fused.unfuse(), strict=True):
        assert back.fmt == part.fmt and torch.equal(back.codes, part.codes)
        assert torch.equal(back.scales, part.scales)
        assert (back.bias is None) == (part.bias is None) and (back.bias is None or torch.equal(back.bias, part.bias))
        assert back.rank == part.rank
        if part.rank:
            assert torch.equal(back.low_rank_a, part.low_rank_a) and torch.equal(back.low_rank_b, part.low_rank_b)
        assert back.low_rank_bits == part.low_rank_bits and back.bits_per_weight() == part.bits_per_weight()
    assert parts[2].low_rank_bits == 8 and torch.equal(fused.unfuse()[2].low_rank_a_scale, parts[2].low_rank_a_scale)


def test_fuse_projections_takes_trellis_siblings_and_refuses_mixed_formats():
    from torch import nn

    from lit_cb.fused import FusedSlice, FusedTrellisLinear, fuse_projections, unfuse_projections

    parent = nn.Module()
    parent.q, parent.k, parent.v = _parts_for_fusion()
    x = torch.randn(4, 48)
    with torch.no_grad():
        ref = [parent.q(x), parent.k(x), parent.v(x)]
        assert fuse_projections(parent, groups=[("q", "k", "v")]) == 1
        assert isinstance(parent.fused_q_k_v, FusedTrellisLinear) and isinstance(parent.k, FusedSlice)
        got = [parent.q(x), parent.k(x), parent.v(x)]
    assert all(torch.allclose(g, r, atol=1e-5) for g, r in zip(got, ref, strict=True))
    assert unfuse_projections(parent) == 1 and isinstance(parent.q, TrellisLinear)
    other = nn.Module()  # another rotation seed: the input would be rotated differently, so no fusion
    other.q = _layer(TrellisFormat(48, 32, tile_rows=16, tile_cols=8), seed=1)
    other.k = _layer(TrellisFormat(48, 32, tile_rows=16, tile_cols=8, rotation_seed=7), seed=2)
    assert fuse_projections(other, groups=[("q", "k")]) == 0 and isinstance(other.q, TrellisLinear)
    with pytest.raises(ValueError, match="formats differ"):
        FusedTrellisLinear([other.q, other.k])
