import pytest
import torch

from lit_cb.layers import CodebookFormat, CodebookLinear, pack_codes, unpack_codes


def _dense_reference(codes, codebooks, scales):
    """Float64 weight, built element by element from the definition."""
    O, I, M = codes.shape
    _, _, og, g = codebooks.shape
    W = torch.zeros(O * og, I * g, dtype=torch.float64)
    for o in range(O):
        for i in range(I):
            block = sum(codebooks[m, codes[o, i, m]].double() for m in range(M))
            W[o * og : (o + 1) * og, i * g : (i + 1) * g] = scales[o].double() * block
    return W


@pytest.mark.parametrize("M,B,g,og,bias", [(1, 8, 4, 1, False), (2, 3, 8, 1, True), (1, 16, 2, 2, False)])
def test_forward_equals_dense_matmul(M, B, g, og, bias):
    torch.manual_seed(M * 100 + B)
    fmt = CodebookFormat(
        in_features=16,
        out_features=6,
        in_group_size=g,
        out_group_size=og,
        num_codebooks=M,
        nbits_per_codebook=B,
        bias=bias,
    )
    codes = torch.randint(0, 2**B, (fmt.num_out_groups, fmt.num_in_groups, M))
    codebooks = torch.randn(M, 2**B, og, g)
    scales = torch.rand(fmt.num_out_groups, 1, 1, 1) + 0.5
    b = torch.randn(6) if bias else None
    layer = CodebookLinear.from_tensors(fmt, codes, codebooks, scales, b, dtype=torch.float32)
    W = _dense_reference(codes, codebooks, scales)
    x = torch.randn(3, 5, 16)
    expected = x.double() @ W.T + (b.double() if bias else 0)
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.dequantize().double(), W, rtol=1e-6, atol=1e-6)


def test_gradient_reaches_the_input():
    fmt = CodebookFormat(in_features=8, out_features=4, in_group_size=4, nbits_per_codebook=2)
    layer = CodebookLinear.from_tensors(
        fmt, torch.randint(0, 4, (4, 2, 1)), torch.randn(1, 4, 1, 4), torch.ones(4, 1, 1, 1), dtype=torch.float64
    )
    x = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(layer, (x,))


def test_int16_codes_wrap_and_unwrap_for_16_bits():
    idx = torch.tensor([0, 1, 2**15 - 1, 2**15, 2**16 - 1])
    packed = pack_codes(idx, 16)
    assert packed.dtype == torch.int16
    assert packed.tolist() == [0, 1, 32767, -32768, -1]
    assert unpack_codes(packed, 16).tolist() == idx.tolist()
    with pytest.raises(ValueError, match="must lie in"):
        pack_codes(torch.tensor([256]), 8)


def test_bits_per_weight_hand_count():
    # 576x576, one 256x4 codebook: codes 2 bits/weight, codebook 256*4*16 bits, scales 576*16 bits.
    fmt = CodebookFormat(in_features=576, out_features=576, in_group_size=4, nbits_per_codebook=8)
    expected = (576 * 144 * 8 + 256 * 4 * 16 + 576 * 16) / (576 * 576)
    assert fmt.bits_per_weight() == pytest.approx(expected)
    assert 2.0 < fmt.bits_per_weight() < 2.1


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"in_group_size": 3}, "in_group_size=3"),
        ({"nbits_per_codebook": 17}, "nbits_per_codebook=17"),
        ({"in_features": 10}, "in_features=10"),
        ({"num_codebooks": 0}, "num_codebooks=0"),
    ],
)
def test_bad_formats_name_the_field(kwargs, match):
    base = {"in_features": 16, "out_features": 8}
    with pytest.raises(ValueError, match=match):
        CodebookFormat(**{**base, **kwargs})


def test_low_rank_correction_adds_b_times_a_and_counts_its_bits():
    torch.manual_seed(3)
    fmt = CodebookFormat(in_features=8, out_features=4, in_group_size=4, nbits_per_codebook=2)
    codes, codebooks, scales = torch.randint(0, 4, (4, 2, 1)), torch.randn(1, 4, 1, 4), torch.rand(4, 1, 1, 1)
    layer = CodebookLinear.from_tensors(fmt, codes, codebooks, scales, dtype=torch.float64)
    a, b = torch.randn(2, 8, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    layer.add_low_rank(a, b)
    W = _dense_reference(codes, codebooks, scales) + b @ a
    x = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ W.T)
    assert layer.bits_per_weight() == pytest.approx(fmt.bits_per_weight() + 16 * 2 * (8 + 4) / 32)
