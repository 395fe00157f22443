"""Triton kernels of lit_cb.kernels against an independent float64 reference, on CPU under the
Triton interpreter (CI has no GPU).

TRITON_INTERPRET must be set before the kernels are *decorated* (triton.jit picks the interpreter at
decoration time), not merely before triton is imported; another test may already have imported the
kernel module for real, so :func:`_kernel_modules` reloads it when its kernels are not interpreted.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402
import importlib.util  # noqa: E402
import pathlib  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402, F401  (a missing Triton fails the module, never skips it)

from lit_cb.layers import CodebookFormat, CodebookLinear, pack_codes  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def _kernel_modules():
    from triton.runtime.interpreter import InterpretedFunction

    codebook = importlib.import_module("lit_cb.kernels.codebook")
    ops = importlib.import_module("lit_cb.kernels.ops")
    dispatch = importlib.import_module("lit_cb.kernels.dispatch")
    if not isinstance(codebook._cb_gemv_kernel, InterpretedFunction):
        codebook = importlib.reload(codebook)  # decorated before TRITON_INTERPRET was set
    return codebook, ops, dispatch


if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("TRITON_INTERPRET is set to something other than 1", allow_module_level=True)

K, OPS, DISPATCH = _kernel_modules()


# ------------------------------------------------------------------------------- reference & data


def random_layer(fmt: CodebookFormat, gen: torch.Generator, dtype=torch.float16):
    """Fresh random codes (int64 indices), codebooks, scales, bias of a format."""
    idx = torch.randint(
        0, 2**fmt.nbits_per_codebook, (fmt.num_out_groups, fmt.num_in_groups, fmt.num_codebooks), generator=gen
    )
    codebooks = torch.randn(fmt.num_codebooks, fmt.codebook_size, 1, fmt.in_group_size, generator=gen).to(dtype)
    scales = (torch.rand(fmt.num_out_groups, 1, 1, 1, generator=gen) + 0.5).to(dtype)
    bias = torch.randn(fmt.out_features, generator=gen).to(dtype) if fmt.bias else None
    return idx, pack_codes(idx, fmt.nbits_per_codebook), codebooks, scales, bias


def reference_weight(idx: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float64 dense W from int64 indices, written independently of lit_cb.layers.dequantize_weight."""
    num_out, num_groups, num_cb = idx.shape
    cb = codebooks.double()[:, :, 0, :]  # [M, 2**B, g]
    w = torch.zeros(num_out, num_groups, cb.shape[-1], dtype=torch.float64)
    for m in range(num_cb):
        w += cb[m][idx[:, :, m]]
    w *= scales.double().reshape(num_out, 1, 1)
    return w.reshape(num_out, num_groups * cb.shape[-1])


def reference_out(x, idx, codebooks, scales, bias):
    y = x.double() @ reference_weight(idx, codebooks, scales).T
    return y if bias is None else y + bias.double()


def assert_within_fp16_rounding(y, x, idx, codebooks, scales, bias) -> None:
    """Elementwise forward-error bound of an fp16 kernel, derived, not tuned.

    The decode-into-``tl.dot`` kernel sums codewords in fp32 and rounds the sum once to fp16 (relative
    error <= u = 2**-11); the FMA matvec keeps W in fp32, so the bound holds for it with room. Both
    accumulate x @ W'^T in fp32, apply scale and bias in fp32 and round the output to fp16 (<= u|y|).
    So |y - ref| <= u * s * (|x| @ |W'|^T) + u * |ref| + (fp32 terms, bounded by 2**-20 of the same sums).
    A relative-norm tolerance cannot hold for every draw: with few outputs, cancellation makes |ref| small.
    """
    u = 2.0**-11
    w_abs = reference_weight(idx, codebooks, scales).abs()  # scale folded in: s * |W'|
    ref = reference_out(x, idx, codebooks, scales, bias)
    mag = x.double().abs() @ w_abs.T
    bound = u * mag + u * ref.abs() + 2.0**-20 * (mag + ref.abs()) + 1e-12
    excess = ((y.double() - ref).abs() - bound).max().item()
    assert torch.isfinite(y).all() and excess <= 0, f"error exceeds the fp16 rounding bound by {excess:.3g}"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all(), "non-finite output (unwritten element?)"
    return float((a.double() - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(autouse=True)
def _poison_empty(monkeypatch):
    """Every output the launchers allocate starts as NaN, so an element no program writes fails."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(K.torch, "empty", poisoned)
    yield


TOL = {torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5}

# (M, B, g, in, out, bias): every code width, packed and unpacked loads, ragged in/out
FORMATS = [
    (1, 8, 4, 52, 9, False),  # 1x8 g4, the LLM-Codebook default; in=52 -> 13 groups, not a block multiple
    (2, 8, 8, 40, 7, True),  # 2x8 g8 (AQLM): packed int16 words
    (1, 16, 8, 24, 1, False),  # 1x16 g8: int16 with the 2**15 wrap; out = 1
    (2, 12, 4, 36, 5, True),  # B between 8 and 16: int16 masked, two unpacked codebooks
    (1, 10, 8, 48, 6, False),
    (2, 16, 4, 20, 3, False),  # 2x16: packed int32 words
]


def _fmt(m, b, g, k, n, bias):
    return CodebookFormat(
        in_features=k, out_features=n, in_group_size=g, num_codebooks=m, nbits_per_codebook=b, bias=bias
    )


@pytest.mark.parametrize("spec", FORMATS, ids=lambda s: f"{s[0]}x{s[1]}_g{s[2]}_{s[3]}x{s[4]}")
@pytest.mark.parametrize("tokens", [1, 3])
def test_gemv(spec, tokens):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((spec, tokens)).encode()))
    fmt = _fmt(*spec)
    idx, codes, codebooks, scales, bias = random_layer(fmt, gen)
    x = torch.randn(tokens, fmt.in_features, generator=gen).half()
    cfg = K.GemvConfig(block_n=4, block_g=8, num_warps=1, num_stages=1)  # several programs per axis
    y = K.codebook_gemv(x, codes, codebooks, scales, bias, fmt.nbits_per_codebook, cfg)
    assert y.shape == (tokens, fmt.out_features) and y.dtype == x.dtype
    assert_within_fp16_rounding(y, x, idx, codebooks, scales, bias)


# B <= 8 formats for the lookup-table kernel: several K tiles with a ragged last one, rows over several
# splits and gather steps, 2**B from 16 to 256
LUT_FORMATS = [
    (1, 8, 4, 152, 37, False),  # 38 groups -> 3 K tiles of 16
    (2, 8, 8, 200, 9, True),  # 25 groups -> 4 K tiles of 8; two table columns per group
    (1, 5, 8, 136, 5, False),  # 2**5 codewords, 17 groups
    (1, 4, 4, 64, 1, True),  # the smallest table tl.dot takes; out = 1
]


@pytest.mark.parametrize("spec", LUT_FORMATS, ids=lambda s: f"{s[0]}x{s[1]}_g{s[2]}_{s[3]}x{s[4]}")
@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_lut_gemv(spec, tokens, dtype):
    gen = torch.Generator().manual_seed(sum(spec[:5]) * 31 + tokens)
    fmt = _fmt(*spec)
    idx, codes, codebooks, scales, bias = random_layer(fmt, gen)
    x = torch.randn(tokens, fmt.in_features, generator=gen).to(dtype)
    scales, bias = scales.to(dtype), bias.to(dtype) if bias is not None else None
    cfg = K.LutConfig(block_g=16 // fmt.num_codebooks, block_n=4, num_warps=1, num_stages=1)
    y = K.codebook_lut_gemv(x, codes, codebooks, scales, bias, fmt.nbits_per_codebook, cfg)
    assert y.shape == (tokens, fmt.out_features) and y.dtype == dtype
    assert rel_err(y, reference_out(x, idx, codebooks, scales, bias)) < TOL[dtype]


def test_lut_gemv_refuses_large_codebooks():
    fmt = _fmt(1, 10, 8, 48, 6, False)
    _, codes, codebooks, scales, _ = random_layer(fmt, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="nbits_per_codebook <= 8, got 10"):
        K.codebook_lut_gemv(torch.randn(1, 48).half(), codes, codebooks, scales, None, 10)


@pytest.mark.parametrize("spec", FORMATS, ids=lambda s: f"{s[0]}x{s[1]}_g{s[2]}_{s[3]}x{s[4]}")
@pytest.mark.parametrize("tokens", [1, 17])
def test_mm(spec, tokens):
    # zlib, not hash(): a str in the key made hash() differ per process (PYTHONHASHSEED), so the data did too
    gen = torch.Generator().manual_seed(zlib.crc32(repr((spec, tokens, "mm")).encode()))
    fmt = _fmt(*spec)
    idx, codes, codebooks, scales, bias = random_layer(fmt, gen)
    x = torch.randn(tokens, fmt.in_features, generator=gen).half()
    for decode_2d in (False, True):
        cfg = K.MMConfig(
            block_m=16,
            block_n=16,
            block_g=16 // fmt.in_group_size,
            num_warps=1,
            num_stages=1,
            group_m=2,
            decode_2d=decode_2d,
        )
        y = K.codebook_mm(x, codes, codebooks, scales, bias, fmt.nbits_per_codebook, cfg)
        assert y.shape == (tokens, fmt.out_features)
        assert_within_fp16_rounding(y, x, idx, codebooks, scales, bias)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dtypes(dtype):
    gen = torch.Generator().manual_seed(7)
    fmt = _fmt(2, 8, 8, 40, 7, True)
    idx, codes, codebooks, scales, bias = random_layer(fmt, gen)
    x = torch.randn(3, fmt.in_features, generator=gen).to(dtype)
    ref = reference_out(x, idx, codebooks, scales, bias)
    y = K.codebook_gemv(x, codes, codebooks, scales, bias, 8, K.GemvConfig(block_n=8, block_g=8, num_stages=1))
    assert y.dtype == dtype and rel_err(y, ref) < TOL[dtype]
    if dtype == torch.bfloat16:
        # the interpreter's tl.dot has no bf16 (numpy does not): bench/kernel_bench.py checks bf16 mm on the GPU
        return
    cfg = K.MMConfig(block_m=16, block_n=16, block_g=2, num_stages=1)
    y = K.codebook_mm(x, codes, codebooks, scales, bias, 8, cfg)
    assert y.dtype == dtype and rel_err(y, ref) < TOL[dtype]


@pytest.mark.parametrize("spec", FORMATS[:3], ids=lambda s: f"{s[0]}x{s[1]}_g{s[2]}")
def test_dequant_and_dense(spec):
    gen = torch.Generator().manual_seed(zlib.crc32(repr(spec).encode()))
    fmt = _fmt(*spec)
    idx, codes, codebooks, scales, bias = random_layer(fmt, gen)
    w = K.codebook_dequant(
        codes,
        codebooks,
        scales,
        fmt.nbits_per_codebook,
        torch.float16,
        K.DequantConfig(block_n=4, block_g=4, num_warps=1),
    )
    assert rel_err(w, reference_weight(idx, codebooks, scales)) < 1e-3
    x = torch.randn(5, fmt.in_features, generator=gen).half()
    y = K.codebook_dense(x.float(), codes, codebooks, scales, bias, fmt.nbits_per_codebook)
    assert rel_err(y, reference_out(x, idx, codebooks, scales, bias)) < TOL[torch.float16]


def test_custom_op_autograd_matches_float64():
    """Forward and grad w.r.t. input and bias through lit_cb::codebook_linear (3-D input, 17 tokens)."""
    gen = torch.Generator().manual_seed(11)
    fmt = _fmt(2, 8, 8, 40, 7, True)
    idx, codes, codebooks, scales, bias = random_layer(fmt, gen, dtype=torch.float32)
    x = torch.randn(1, 17, fmt.in_features, generator=gen, dtype=torch.float32, requires_grad=True)
    b = bias.clone().requires_grad_(True)
    gy = torch.randn(1, 17, fmt.out_features, generator=gen, dtype=torch.float32)
    for algo in ("gemv", "mm", "dense"):
        x.grad = b.grad = None
        y = torch.ops.lit_cb.codebook_linear(x, codes, codebooks, scales, b, 8, algo)
        (y * gy).sum().backward()
        xd = x.detach().double().requires_grad_(True)
        bd = bias.double().requires_grad_(True)
        w = reference_weight(idx, codebooks, scales)
        yd = xd @ w.T + bd
        (yd * gy.double()).sum().backward()
        assert rel_err(y.detach(), yd.detach()) < TOL[torch.float32], algo
        assert rel_err(x.grad, xd.grad) < TOL[torch.float32], algo
        assert rel_err(b.grad, bd.grad) < TOL[torch.float32], algo


def test_opcheck():
    """Schema, fake tensor and autograd registration are consistent (what torch.compile relies on)."""
    gen = torch.Generator().manual_seed(3)
    fmt = _fmt(1, 8, 4, 16, 4, True)
    _, codes, codebooks, scales, bias = random_layer(fmt, gen, dtype=torch.float32)
    x = torch.randn(2, fmt.in_features, generator=gen, requires_grad=True)
    torch.library.opcheck(
        torch.ops.lit_cb.codebook_linear.default,
        (x, codes, codebooks, scales, bias, 8, "mm"),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


def test_layer_dispatch_and_fallbacks():
    gen = torch.Generator().manual_seed(5)
    fmt = _fmt(2, 8, 8, 40, 7, True)
    idx, _, codebooks, scales, bias = random_layer(fmt, gen)
    layer = CodebookLinear.from_tensors(fmt, idx, codebooks, scales, bias)
    x = torch.randn(3, fmt.in_features, generator=gen).half()
    # CPU tensors never reach the kernels unless a test asks for the interpreter
    assert DISPATCH.select_kernel(fmt, x) is None
    with DISPATCH.interpreter_on_cpu():
        kernel = DISPATCH.select_kernel(fmt, x)
        assert kernel is not None
        y = kernel(x, layer.codes, layer.codebooks, layer.scales, layer.bias, layer.fmt)
        assert rel_err(y, reference_out(x, idx, codebooks, scales, bias)) < TOL[torch.float16]
        # out_group_size != 1 has no kernel
        fmt_og = CodebookFormat(in_features=8, out_features=4, in_group_size=4, out_group_size=2)
        assert DISPATCH.select_kernel(fmt_og, torch.randn(1, 8).half()) is None
        # trainable codebooks: the callable falls back to the differentiable reference
        layer.codebooks.requires_grad_(True)
        y = kernel(x, layer.codes, layer.codebooks, layer.scales, layer.bias, layer.fmt)
        assert "lit_cb" not in type(y.grad_fn).__name__
        y.float().sum().backward()
        assert layer.codebooks.grad is not None and torch.isfinite(layer.codebooks.grad).all()
        assert rel_err(y.detach(), reference_out(x, idx, codebooks, scales, bias)) < TOL[torch.float16]


def test_choose_algo_by_tokens():
    fmt = _fmt(2, 8, 8, 4096, 4096, False)
    assert DISPATCH.choose_algo(fmt, 1) == "gemv"
    assert DISPATCH.choose_algo(fmt, 4096) == "dense"
    algos = [DISPATCH.choose_algo(fmt, t) for t in range(1, 300)]
    assert set(algos) <= set(OPS.ALGOS)
