"""Triton kernels for :class:`lit_cb.layers.CodebookLinear` (out_group_size == 1).

Weight row ``n``, input group ``i`` is ``scales[n] * sum_m codebooks[m, codes[n, i, m], 0, :]``.
Three kernel families, all reading the codes exactly once per output tile:

* ``gemv``    one token per program row, FMA reduction: the decode path for a handful of tokens. Each
  program owns ``BLOCK_N`` output rows and walks the whole input; codewords are gathered from the
  codebooks, which stay in L1/L2 (2x8: 8 KB, 1x8 g4: 2 KB) while the codes stream from HBM once.
* ``mm``      decodes a ``[BLOCK_N, BLOCK_K]`` tile of W on the fly into ``tl.dot`` (tensor cores):
  small-batch decode (16 tokens, one ``BLOCK_M=16`` tile so W is decoded once) and prefill.
* ``dequant`` a transient dense copy of W for cuBLAS (prefill where it wins, and the input gradient).

The launchers here take plain tensors and a config; :mod:`lit_cb.kernels.ops` wraps them as torch
custom ops and :mod:`lit_cb.kernels.dispatch` picks one per call.

Codes are read in their storage dtype: uint8 (B <= 8) or int16 (B <= 16, wrapped above 2**15), and are
unwrapped in-kernel with ``& (2**B - 1)``. When the ``M`` codes of a group fit in one 16/32-bit word
(2x8, 4x8, 2x16) the launcher reinterprets them as that word, so one load fetches all of a group's codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class GemvConfig:
    """Tile of the FMA matvec: ``BLOCK_N`` output rows x ``BLOCK_G`` input groups per step."""

    block_n: int = 8
    block_g: int = 64
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class MMConfig:
    """Tile of the decode-into-``tl.dot`` matmul; ``BLOCK_K = block_g * in_group_size``."""

    block_m: int = 16
    block_n: int = 64
    block_g: int = 8
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8
    decode_2d: bool = False


@dataclass(frozen=True)
class DequantConfig:
    block_n: int = 32
    block_g: int = 32
    num_warps: int = 4


@triton.jit
def _load_codes(
    codes_ptr,
    offs_n,
    offs_g,
    mask,
    stride_cn,
    m: tl.constexpr,
    NUM_CODEBOOKS: tl.constexpr,
    NBITS: tl.constexpr,
    PACKED: tl.constexpr,
    WORD_BITS: tl.constexpr,
):
    """Codes of codebook ``m`` for rows ``offs_n`` x groups ``offs_g`` as int32 indices in [0, 2**NBITS)."""
    if PACKED:
        # one word per group holds all NUM_CODEBOOKS codes, little-endian: codebook m in bits [m*W, (m+1)*W)
        word = tl.load(codes_ptr + offs_n[:, None] * stride_cn + offs_g[None, :], mask=mask, other=0)
        word = word.to(tl.int32)
        c = (word >> (m * WORD_BITS)) & ((1 << NBITS) - 1)
    else:
        c = tl.load(codes_ptr + offs_n[:, None] * stride_cn + offs_g[None, :] * NUM_CODEBOOKS + m, mask=mask, other=0)
        c = c.to(tl.int32) & ((1 << NBITS) - 1)
    return c


@triton.jit
def _decode_tile(
    codes_ptr,
    cb_ptr,
    offs_n,
    offs_g,
    offs_j,
    mask,
    stride_cn,
    NUM_CODEBOOKS: tl.constexpr,
    NBITS: tl.constexpr,
    G: tl.constexpr,
    PACKED: tl.constexpr,
    WORD_BITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """Unscaled weights ``[BLOCK_N, BLOCK_G, G]`` in fp32: the sum over codebooks of gathered codewords."""
    w = tl.zeros([BLOCK_N, BLOCK_G, G], dtype=tl.float32)
    for m in tl.static_range(NUM_CODEBOOKS):
        c = _load_codes(codes_ptr, offs_n, offs_g, mask, stride_cn, m, NUM_CODEBOOKS, NBITS, PACKED, WORD_BITS)
        # codebooks: [M, 2**NBITS, 1, G]; a codeword is G contiguous halves (vector gather)
        cw_ptr = cb_ptr + (m * (1 << NBITS) * G) + c[:, :, None] * G + offs_j[None, None, :]
        w += tl.load(cw_ptr).to(tl.float32)
    return w


@triton.jit
def _cb_gemv_kernel(
    x_ptr,
    codes_ptr,
    cb_ptr,
    scales_ptr,
    bias_ptr,
    out_ptr,
    N,
    K_GROUPS,
    stride_xt,
    stride_ot,
    stride_cn,
    NUM_CODEBOOKS: tl.constexpr,
    NBITS: tl.constexpr,
    G: tl.constexpr,
    PACKED: tl.constexpr,
    WORD_BITS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """out[t, n] = scales[n] * sum_k x[t, k] W'[n, k] + bias[n]; grid (cdiv(N, BLOCK_N), tokens)."""
    pid_n = tl.program_id(0)
    t = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_j = tl.arange(0, G)
    x_row = x_ptr + t.to(tl.int64) * stride_xt
    acc = tl.zeros([BLOCK_N, BLOCK_G], dtype=tl.float32)
    for kg in range(0, K_GROUPS, BLOCK_G):
        offs_g = kg + tl.arange(0, BLOCK_G)
        g_mask = offs_g < K_GROUPS
        xv = tl.load(x_row + offs_g[:, None] * G + offs_j[None, :], mask=g_mask[:, None], other=0.0)
        xv = xv.to(tl.float32)  # [BLOCK_G, G]
        mask = n_mask[:, None] & g_mask[None, :]
        w = _decode_tile(
            codes_ptr,
            cb_ptr,
            offs_n,
            offs_g,
            offs_j,
            mask,
            stride_cn,
            NUM_CODEBOOKS,
            NBITS,
            G,
            PACKED,
            WORD_BITS,
            BLOCK_N,
            BLOCK_G,
        )  # [BLOCK_N, BLOCK_G, G]
        acc += tl.sum(w * xv[None, :, :], axis=2)
    out = tl.sum(acc, axis=1)
    out = out * tl.load(scales_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64) * stride_ot + offs_n, out.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _cb_mm_kernel(
    x_ptr,
    codes_ptr,
    cb_ptr,
    scales_ptr,
    bias_ptr,
    out_ptr,
    T,
    N,
    K_GROUPS,
    stride_xt,
    stride_ot,
    stride_cn,
    NUM_CODEBOOKS: tl.constexpr,
    NBITS: tl.constexpr,
    G: tl.constexpr,
    PACKED: tl.constexpr,
    WORD_BITS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
    GROUP_M: tl.constexpr,
    DECODE_2D: tl.constexpr,
):
    """out = (x @ W'^T) * scales + bias with W' tiles decoded in registers and fed to ``tl.dot``."""
    BLOCK_K: tl.constexpr = BLOCK_G * G
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(T, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # grouped order: GROUP_M token tiles share each W tile while it is hot in L2
    width = GROUP_M * num_pid_n
    group_id = pid // width
    first_m = group_id * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_size
    pid_n = (pid % width) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < T
    n_mask = offs_n < N
    offs_j = tl.arange(0, G)
    offs_kk = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xt
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kg in range(0, K_GROUPS, BLOCK_G):
        offs_g = kg + tl.arange(0, BLOCK_G)
        g_mask = offs_g < K_GROUPS
        offs_k = kg * G + offs_kk
        xt = tl.load(
            x_rows + offs_k[None, :], mask=m_mask[:, None] & (offs_k[None, :] < K_GROUPS * G), other=0.0
        )  # [BLOCK_M, BLOCK_K]
        if DECODE_2D:
            # element-wise decode straight into the [BLOCK_N, BLOCK_K] operand: scalar gathers, no reshape
            grp = kg + offs_kk // G
            mask2 = n_mask[:, None] & (grp < K_GROUPS)[None, :]
            w = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            for m in tl.static_range(NUM_CODEBOOKS):
                c = _load_codes(codes_ptr, offs_n, grp, mask2, stride_cn, m, NUM_CODEBOOKS, NBITS, PACKED, WORD_BITS)
                w += tl.load(cb_ptr + (m * (1 << NBITS) * G) + c * G + (offs_kk % G)[None, :]).to(tl.float32)
            w = w.to(xt.dtype)
        else:
            w = _decode_tile(
                codes_ptr,
                cb_ptr,
                offs_n,
                offs_g,
                offs_j,
                n_mask[:, None] & g_mask[None, :],
                stride_cn,
                NUM_CODEBOOKS,
                NBITS,
                G,
                PACKED,
                WORD_BITS,
                BLOCK_N,
                BLOCK_G,
            )  # [BLOCK_N, BLOCK_G, G]
            w = tl.reshape(w, [BLOCK_N, BLOCK_K]).to(xt.dtype)
        if IEEE:
            acc = tl.dot(xt, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, tl.trans(w), acc)
    acc = acc * tl.load(scales_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_ot + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _cb_dequant_kernel(
    codes_ptr,
    cb_ptr,
    scales_ptr,
    w_ptr,
    N,
    K_GROUPS,
    stride_cn,
    stride_wn,
    NUM_CODEBOOKS: tl.constexpr,
    NBITS: tl.constexpr,
    G: tl.constexpr,
    PACKED: tl.constexpr,
    WORD_BITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """Dense scaled W ``[N, K_GROUPS * G]`` in w_ptr's dtype."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    offs_j = tl.arange(0, G)
    n_mask = offs_n < N
    g_mask = offs_g < K_GROUPS
    w = _decode_tile(
        codes_ptr,
        cb_ptr,
        offs_n,
        offs_g,
        offs_j,
        n_mask[:, None] & g_mask[None, :],
        stride_cn,
        NUM_CODEBOOKS,
        NBITS,
        G,
        PACKED,
        WORD_BITS,
        BLOCK_N,
        BLOCK_G,
    )
    w = w * tl.load(scales_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None, None]
    ptrs = w_ptr + offs_n.to(tl.int64)[:, None, None] * stride_wn + offs_g[None, :, None] * G + offs_j[None, None, :]
    tl.store(ptrs, w.to(w_ptr.dtype.element_ty), mask=(n_mask[:, None] & g_mask[None, :])[:, :, None])


# ----------------------------------------------------------------------------------------- launchers


def _codes_view(codes: torch.Tensor, nbits: int) -> tuple[torch.Tensor, bool, int, int]:
    """(codes as launched, packed?, bits per code in a packed word, row stride in launched elements).

    A group's M codes are packed into one wider word when they tile it exactly, so one load gets them all.
    """
    num_out, num_groups, num_cb = codes.shape
    codes = codes.contiguous()
    elem_bits = 8 if codes.dtype == torch.uint8 else 16
    total_bits = elem_bits * num_cb
    if num_cb > 1 and total_bits in (16, 32):
        word = torch.int16 if total_bits == 16 else torch.int32
        return codes.view(word).reshape(num_out, num_groups), True, elem_bits, num_groups
    return codes, False, elem_bits, num_groups * num_cb


def _check(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, nbits: int) -> None:
    if codebooks.shape[2] != 1:
        raise ValueError("the Triton kernels need out_group_size == 1")
    if codes.dtype not in (torch.uint8, torch.int16):
        raise ValueError(f"codes must be uint8 or int16, got {codes.dtype}")
    if codes.shape[1] * codebooks.shape[3] != x.shape[-1]:
        raise ValueError(f"x has {x.shape[-1]} features, codes expect {codes.shape[1] * codebooks.shape[3]}")
    if codes.numel() >= 2**31:
        raise ValueError("codes with >= 2**31 elements need 64-bit offsets, which these kernels do not use")


def codebook_gemv(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    nbits: int,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """``x [T, K] -> [T, N]`` with one matvec per token (FMA path; W decoded once per token)."""
    _check(x, codes, codebooks, nbits)
    cfg = config or GemvConfig()
    x = x.contiguous()
    num_out, num_groups, num_cb = codes.shape
    g = codebooks.shape[3]
    codes_l, packed, word_bits, stride_cn = _codes_view(codes, nbits)
    out = torch.empty(x.shape[0], num_out, dtype=x.dtype, device=x.device)
    if x.shape[0] == 0:
        return out
    grid = (triton.cdiv(num_out, cfg.block_n), x.shape[0])
    _cb_gemv_kernel[grid](
        x,
        codes_l,
        codebooks.contiguous(),
        scales.reshape(-1).contiguous(),
        bias if bias is not None else scales,
        out,
        num_out,
        num_groups,
        x.stride(0),
        out.stride(0),
        stride_cn,
        NUM_CODEBOOKS=num_cb,
        NBITS=nbits,
        G=g,
        PACKED=packed,
        WORD_BITS=word_bits,
        HAS_BIAS=bias is not None,
        BLOCK_N=cfg.block_n,
        BLOCK_G=cfg.block_g,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out


def codebook_mm(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    nbits: int,
    config: MMConfig | None = None,
) -> torch.Tensor:
    """``x [T, K] -> [T, N]`` decoding W tiles into ``tl.dot`` (tensor cores; W decoded once per token tile)."""
    _check(x, codes, codebooks, nbits)
    cfg = config or MMConfig()
    x = x.contiguous()
    num_out, num_groups, num_cb = codes.shape
    g = codebooks.shape[3]
    if cfg.block_g * g < 16:
        raise ValueError("tl.dot needs BLOCK_K = block_g * in_group_size >= 16")
    codes_l, packed, word_bits, stride_cn = _codes_view(codes, nbits)
    tokens = x.shape[0]
    out = torch.empty(tokens, num_out, dtype=x.dtype, device=x.device)
    if tokens == 0:
        return out
    grid = (triton.cdiv(tokens, cfg.block_m) * triton.cdiv(num_out, cfg.block_n),)
    _cb_mm_kernel[grid](
        x,
        codes_l,
        codebooks.contiguous(),
        scales.reshape(-1).contiguous(),
        bias if bias is not None else scales,
        out,
        tokens,
        num_out,
        num_groups,
        x.stride(0),
        out.stride(0),
        stride_cn,
        NUM_CODEBOOKS=num_cb,
        NBITS=nbits,
        G=g,
        PACKED=packed,
        WORD_BITS=word_bits,
        HAS_BIAS=bias is not None,
        IEEE=x.dtype == torch.float32,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_G=cfg.block_g,
        GROUP_M=cfg.group_m,
        DECODE_2D=cfg.decode_2d,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out


def codebook_dequant(
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    nbits: int,
    dtype: torch.dtype,
    config: DequantConfig | None = None,
) -> torch.Tensor:
    """Dense scaled ``W [N, K]`` in ``dtype`` (a transient copy for cuBLAS)."""
    if codebooks.shape[2] != 1:
        raise ValueError("the Triton kernels need out_group_size == 1")
    cfg = config or DequantConfig()
    num_out, num_groups, num_cb = codes.shape
    g = codebooks.shape[3]
    codes_l, packed, word_bits, stride_cn = _codes_view(codes, nbits)
    w = torch.empty(num_out, num_groups * g, dtype=dtype, device=codes.device)
    grid = (triton.cdiv(num_out, cfg.block_n), triton.cdiv(num_groups, cfg.block_g))
    _cb_dequant_kernel[grid](
        codes_l,
        codebooks.contiguous(),
        scales.reshape(-1).contiguous(),
        w,
        num_out,
        num_groups,
        stride_cn,
        w.stride(0),
        NUM_CODEBOOKS=num_cb,
        NBITS=nbits,
        G=g,
        PACKED=packed,
        WORD_BITS=word_bits,
        BLOCK_N=cfg.block_n,
        BLOCK_G=cfg.block_g,
        num_warps=cfg.num_warps,
    )
    return w


def codebook_dense(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    nbits: int,
    config: DequantConfig | None = None,
) -> torch.Tensor:
    """Transient dense W (Triton dequant) + cuBLAS: the prefill path where it beats ``codebook_mm``."""
    _check(x, codes, codebooks, nbits)
    w = codebook_dequant(codes, codebooks, scales, nbits, x.dtype, config)
    return torch.nn.functional.linear(x, w, bias.to(x.dtype) if bias is not None else None)
