"""Triton kernels for :class:`lit_cb.layers.CodebookLinear` (out_group_size == 1).

Weight row ``n``, input group ``i`` is ``scales[n] * sum_m codebooks[m, codes[n, i, m], 0, :]``.
Three kernel families, all reading the codes exactly once per output tile:

* ``gemv``    one token per program row, FMA reduction: the decode path for a handful of tokens. Each
  program owns ``BLOCK_N`` output rows and walks the whole input; codewords are gathered from the
  codebooks, which stay in L1/L2 (2x8: 8 KB, 1x8 g4: 2 KB) while the codes stream from HBM once.
* ``mm``      decodes a ``[BLOCK_N, BLOCK_K]`` tile of W on the fly into ``tl.dot`` (tensor cores):
  small-batch decode (16 tokens, one ``BLOCK_M=16`` tile so W is decoded once) and prefill.
* ``dequant`` a transient dense copy of W for cuBLAS (prefill where it wins, and the input gradient).
* ``lut``     split-K matvec through a per-input lookup table (B <= 8): a program takes one K tile, builds
  ``lut[k, (group, m)] = <codebooks[m, k], x[group]>`` with one ``tl.dot`` and then, for every row of its
  row range, turns each code into a single ``tl.gather`` from that table (a shared-memory load) instead
  of a G-wide codeword fetch and G FMAs. Partial sums per K tile land in an fp32 workspace that a
  second kernel reduces (deterministic, no atomics).

The launchers here take plain tensors and a config; :mod:`lit_cb.kernels.ops` wraps them as torch
custom ops and :mod:`lit_cb.kernels.dispatch` picks one per call.

Codes are read in their storage dtype: uint8 (B <= 8) or int16 (B <= 16, wrapped above 2**15), and are
unwrapped in-kernel with ``& (2**B - 1)``. When the ``M`` codes of a group fit in one 16/32-bit word
(2x8, 4x8, 2x16) the launcher reinterprets them as that word, so one load fetches all of a group's codes.
"""

from __future__ import annotations

import functools
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
    split_k: int = 1


@dataclass(frozen=True)
class LutConfig:
    """Split-K lookup-table matvec: ``block_g`` groups per K tile, ``block_n`` rows per gather step,
    and enough row splits that about ``programs_per_sm`` programs run per SM."""

    block_g: int = 16
    block_n: int = 128
    programs_per_sm: int = 2
    num_warps: int = 4
    num_stages: int = 2


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
        word = tl.load(
            codes_ptr + offs_n[:, None] * stride_cn + offs_g[None, :], mask=mask, other=0, eviction_policy="evict_first"
        )
        word = word.to(tl.int32)
        c = (word >> (m * WORD_BITS)) & ((1 << NBITS) - 1)
    else:
        c = tl.load(
            codes_ptr + offs_n[:, None] * stride_cn + offs_g[None, :] * NUM_CODEBOOKS + m,
            mask=mask,
            other=0,
            eviction_policy="evict_first",
        )
        c = c.to(tl.int32) & ((1 << NBITS) - 1)
    return c


@triton.jit
def _part_offset(offs_n, P1, P2, P3, NUM_PARTS: tl.constexpr, PART_STRIDE: tl.constexpr):
    """Element offset of each row's codebooks in a fused layer's stacked ``[P, M, 2**B, 1, G]`` codebooks:
    rows ``[0, P1)`` use part 0, ``[P1, P2)`` part 1, ... (a single part: all zeros, folded away)."""
    part = tl.zeros_like(offs_n)
    if NUM_PARTS > 1:
        part += (offs_n >= P1).to(offs_n.dtype)
    if NUM_PARTS > 2:
        part += (offs_n >= P2).to(offs_n.dtype)
    if NUM_PARTS > 3:
        part += (offs_n >= P3).to(offs_n.dtype)
    return part * PART_STRIDE


@triton.jit
def _decode_tile(
    codes_ptr,
    cb_ptr,
    cb_off,
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
        cw_ptr = cb_ptr + cb_off[:, None, None] + (m * (1 << NBITS) * G) + c[:, :, None] * G + offs_j[None, None, :]
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
    P1,
    P2,
    P3,
    NUM_CODEBOOKS: tl.constexpr,
    NBITS: tl.constexpr,
    G: tl.constexpr,
    PACKED: tl.constexpr,
    WORD_BITS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    NUM_PARTS: tl.constexpr,
    PART_STRIDE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """out[t, n] = scales[n] * sum_k x[t, k] W'[n, k] + bias[n]; grid (cdiv(N, BLOCK_N), tokens)."""
    pid_n = tl.program_id(0)
    t = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cb_off = _part_offset(offs_n, P1, P2, P3, NUM_PARTS, PART_STRIDE)
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
            cb_off,
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
    part_ptr,
    T,
    N,
    K_GROUPS,
    GROUPS_PER_SPLIT,
    stride_xt,
    stride_ot,
    stride_cn,
    stride_pt,
    stride_ps,
    P1,
    P2,
    P3,
    NUM_CODEBOOKS: tl.constexpr,
    NBITS: tl.constexpr,
    G: tl.constexpr,
    PACKED: tl.constexpr,
    WORD_BITS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    NUM_PARTS: tl.constexpr,
    PART_STRIDE: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
    GROUP_M: tl.constexpr,
    DECODE_2D: tl.constexpr,
):
    """out = (x @ W'^T) * scales + bias with W' tiles decoded in registers and fed to ``tl.dot``; grid
    (token tiles x row tiles, SPLIT_K). With SPLIT_K > 1 each program takes ``GROUPS_PER_SPLIT`` input
    groups (a multiple of BLOCK_G) and writes its unscaled fp32 partial sums to ``part[t, split, n]``, which
    :func:`_splitk_reduce_kernel` sums, scales and biases: more programs for narrow outputs at few tokens."""
    BLOCK_K: tl.constexpr = BLOCK_G * G
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
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
    cb_off = _part_offset(offs_n, P1, P2, P3, NUM_PARTS, PART_STRIDE)
    m_mask = offs_m < T
    n_mask = offs_n < N
    offs_j = tl.arange(0, G)
    offs_kk = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xt
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_begin = pid_k * GROUPS_PER_SPLIT
    k_end = tl.minimum(k_begin + GROUPS_PER_SPLIT, K_GROUPS)
    for kg in range(k_begin, k_end, BLOCK_G):
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
                cw = cb_ptr + cb_off[:, None] + (m * (1 << NBITS) * G) + c * G + (offs_kk % G)[None, :]
                w += tl.load(cw).to(tl.float32)
            w = w.to(xt.dtype)
        else:
            w = _decode_tile(
                codes_ptr,
                cb_ptr,
                cb_off,
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
    if SPLIT_K > 1:
        part_ptrs = part_ptr + offs_m.to(tl.int64)[:, None] * stride_pt + pid_k * stride_ps + offs_n[None, :]
        tl.store(part_ptrs, acc, mask=m_mask[:, None] & n_mask[None, :])
    else:
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
    P1,
    P2,
    P3,
    NUM_CODEBOOKS: tl.constexpr,
    NBITS: tl.constexpr,
    G: tl.constexpr,
    PACKED: tl.constexpr,
    WORD_BITS: tl.constexpr,
    NUM_PARTS: tl.constexpr,
    PART_STRIDE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """Dense scaled W ``[N, K_GROUPS * G]`` in w_ptr's dtype."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cb_off = _part_offset(offs_n, P1, P2, P3, NUM_PARTS, PART_STRIDE)
    offs_g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    offs_j = tl.arange(0, G)
    n_mask = offs_n < N
    g_mask = offs_g < K_GROUPS
    w = _decode_tile(
        codes_ptr,
        cb_ptr,
        cb_off,
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


@triton.jit
def _cb_lut_gemv_kernel(
    x_ptr,
    codes_ptr,
    cb_ptr,
    part_ptr,
    N,
    K_GROUPS,
    ROWS_PER_PROG,
    stride_xt,
    stride_cn,
    stride_pt,
    stride_ps,
    NUM_CODEBOOKS: tl.constexpr,
    NBITS: tl.constexpr,
    G: tl.constexpr,
    KD: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """part[t, pid_k, n] = sum over this K tile's groups of scale-free W'[n, :] . x[t, :]; grid
    (K tiles, row splits, tokens)."""
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    t = tl.program_id(2)
    NCODE: tl.constexpr = 1 << NBITS
    C: tl.constexpr = BLOCK_G * NUM_CODEBOOKS  # table columns: (group in tile, codebook), as codes lie in memory
    # A: [NCODE, KD], A[k, m*G + j] = codebooks[m, k, 0, j]; zero-padded to KD >= 16 for tl.dot
    offs_code = tl.arange(0, NCODE)
    offs_r = tl.arange(0, KD)
    r_m = offs_r // G
    r_j = offs_r % G
    r_ok = offs_r < NUM_CODEBOOKS * G
    a = tl.load(
        cb_ptr + r_m[None, :] * (NCODE * G) + offs_code[:, None] * G + r_j[None, :], mask=r_ok[None, :], other=0.0
    )
    # X: [KD, C], X[m*G + j, gi*M + m'] = x[t, (tile + gi)*G + j] if m == m' (block-diagonal in the codebooks)
    offs_c = tl.arange(0, C)
    c_grp = pid_k * BLOCK_G + offs_c // NUM_CODEBOOKS
    c_ok = c_grp < K_GROUPS
    x_mask = (r_m[:, None] == (offs_c % NUM_CODEBOOKS)[None, :]) & r_ok[:, None] & c_ok[None, :]
    xv = tl.load(x_ptr + t.to(tl.int64) * stride_xt + c_grp[None, :] * G + r_j[:, None], mask=x_mask, other=0.0)
    # fp16 codebooks and fp16/bf16 activations are exact in tf32 (10-bit mantissa); fp32 input needs ieee
    if IEEE:
        lut = tl.dot(a.to(tl.float32), xv.to(tl.float32), input_precision="ieee")  # [NCODE, C]
    else:
        lut = tl.dot(a.to(tl.float32), xv.to(tl.float32), input_precision="tf32")
    row_start = pid_n * ROWS_PER_PROG
    row_end = tl.minimum(row_start + ROWS_PER_PROG, N)
    part_row = part_ptr + t.to(tl.int64) * stride_pt + pid_k * stride_ps
    for r0 in range(row_start, row_end, BLOCK_N):
        offs_n = r0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < row_end
        # codes [N, K_GROUPS, M] row-major: this tile's C codes of a row are contiguous
        c = tl.load(
            codes_ptr + offs_n[:, None] * stride_cn + (pid_k * C + offs_c)[None, :],
            mask=n_mask[:, None] & c_ok[None, :],
            other=0,
        )
        vals = tl.gather(lut, c.to(tl.int32) & (NCODE - 1), axis=0)  # [BLOCK_N, C]
        tl.store(part_row + offs_n, tl.sum(vals, axis=1), mask=n_mask)


@triton.jit
def _splitk_reduce_kernel(
    part_ptr,
    scales_ptr,
    bias_ptr,
    out_ptr,
    N,
    SPLITS,
    stride_pt,
    stride_ps,
    stride_ot,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """out[t, n] = scales[n] * sum_s part[t, s, n] + bias[n]; grid (cdiv(N, BLOCK_N), tokens)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    t = tl.program_id(1)
    n_mask = offs_n < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for s0 in range(0, SPLITS, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        ptrs = part_ptr + t.to(tl.int64) * stride_pt + offs_s[:, None] * stride_ps + offs_n[None, :]
        acc += tl.sum(tl.load(ptrs, mask=(offs_s < SPLITS)[:, None] & n_mask[None, :], other=0.0), axis=0)
    acc = acc * tl.load(scales_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64) * stride_ot + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


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


MAX_PARTS = 4


def _parts(codebooks: torch.Tensor, part_sizes, num_out: int) -> tuple[dict, int]:
    """Kernel arguments for a fused layer's row parts: ``(P1, P2, P3, NUM_PARTS, PART_STRIDE)`` as a dict,
    and the codeword width. ``codebooks`` is ``[M, 2**B, 1, G]`` (one part) or ``[P, M, 2**B, 1, G]`` with
    ``part_sizes`` (rows per part, summing to the output rows)."""
    if codebooks.dim() == 4:
        if part_sizes is not None and len(part_sizes) != 1:
            raise ValueError(f"part_sizes={list(part_sizes)} given for un-stacked [M, 2**B, 1, G] codebooks")
        return {"P1": 0, "P2": 0, "P3": 0, "NUM_PARTS": 1, "PART_STRIDE": 0}, codebooks.shape[3]
    if codebooks.dim() != 5:
        raise ValueError(f"codebooks must be [M, 2**B, 1, G] or [P, M, 2**B, 1, G], got {tuple(codebooks.shape)}")
    sizes = [int(v) for v in (part_sizes or [])]
    num_parts = codebooks.shape[0]
    if len(sizes) != num_parts or sum(sizes) != num_out or min(sizes) < 1:
        raise ValueError(
            f"part_sizes={sizes} must give {num_parts} positive row counts summing to {num_out} output rows"
        )
    if num_parts > MAX_PARTS:
        raise ValueError(f"{num_parts} fused parts; the kernels take at most {MAX_PARTS}")
    bounds = [sum(sizes[: i + 1]) for i in range(num_parts - 1)] + [num_out] * (MAX_PARTS - num_parts)
    stride = codebooks[0].numel()
    return {"P1": bounds[0], "P2": bounds[1], "P3": bounds[2], "NUM_PARTS": num_parts, "PART_STRIDE": stride}, (
        codebooks.shape[4]
    )


def _check(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, nbits: int) -> None:
    if codebooks.shape[-2] != 1:
        raise ValueError("the Triton kernels need out_group_size == 1")
    if codes.dtype not in (torch.uint8, torch.int16):
        raise ValueError(f"codes must be uint8 or int16, got {codes.dtype}")
    if codes.shape[1] * codebooks.shape[-1] != x.shape[-1]:
        raise ValueError(f"x has {x.shape[-1]} features, codes expect {codes.shape[1] * codebooks.shape[-1]}")
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
    part_sizes: list[int] | None = None,
) -> torch.Tensor:
    """``x [T, K] -> [T, N]`` with one matvec per token (FMA path; W decoded once per token). Stacked
    ``[P, M, 2**B, 1, G]`` codebooks with ``part_sizes`` run a fused layer (rows of part p use codebooks[p])."""
    _check(x, codes, codebooks, nbits)
    cfg = config or GemvConfig()
    x = x.contiguous()
    num_out, num_groups, num_cb = codes.shape
    parts, g = _parts(codebooks, part_sizes, num_out)
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
        **parts,
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


LUT_MAX_NBITS = 8  # the table has 2**B rows per (group, codebook) column and lives in registers/shared
LUT_MIN_NBITS = 4  # tl.dot needs >= 16 table rows


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # the CPU interpreter: a few row splits, so the split logic is exercised


@functools.cache
def _cuda_sms(index: int) -> int:
    """SM count per device, cached: the split-K heuristics ask on every eager call."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def codebook_lut_gemv(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    nbits: int,
    config: LutConfig | None = None,
) -> torch.Tensor:
    """``x [T, K] -> [T, N]`` through per-token lookup tables (split-K over the input, B <= 8)."""
    _check(x, codes, codebooks, nbits)
    if not LUT_MIN_NBITS <= nbits <= LUT_MAX_NBITS:
        raise ValueError(
            f"the lookup-table kernel needs {LUT_MIN_NBITS} <= nbits_per_codebook <= {LUT_MAX_NBITS}, got {nbits}"
        )
    cfg = config or LutConfig()
    x = x.contiguous()
    num_out, num_groups, num_cb = codes.shape
    g = codebooks.shape[3]
    if cfg.block_g * num_cb < 16:
        raise ValueError("tl.dot needs block_g * num_codebooks >= 16 table columns")
    codes = codes.contiguous()
    tokens = x.shape[0]
    out = torch.empty(tokens, num_out, dtype=x.dtype, device=x.device)
    if tokens == 0:
        return out
    k_tiles = triton.cdiv(num_groups, cfg.block_g)
    row_splits = max(
        1, min(triton.cdiv(num_out, cfg.block_n), triton.cdiv(cfg.programs_per_sm * _num_sms(x.device), k_tiles))
    )
    rows_per_prog = triton.cdiv(triton.cdiv(num_out, row_splits), cfg.block_n) * cfg.block_n
    row_splits = triton.cdiv(num_out, rows_per_prog)
    part = torch.empty(tokens, k_tiles, num_out, dtype=torch.float32, device=x.device)
    _cb_lut_gemv_kernel[(k_tiles, row_splits, tokens)](
        x,
        codes,
        codebooks.contiguous(),
        part,
        num_out,
        num_groups,
        rows_per_prog,
        x.stride(0),
        num_groups * num_cb,
        part.stride(0),
        part.stride(1),
        NUM_CODEBOOKS=num_cb,
        NBITS=nbits,
        G=g,
        KD=max(16, triton.next_power_of_2(num_cb * g)),
        IEEE=x.dtype == torch.float32,
        BLOCK_N=cfg.block_n,
        BLOCK_G=cfg.block_g,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    _reduce_parts(part, scales, bias, out)
    return out


def codebook_mm(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    nbits: int,
    config: MMConfig | None = None,
    part_sizes: list[int] | None = None,
) -> torch.Tensor:
    """``x [T, K] -> [T, N]`` decoding W tiles into ``tl.dot`` (tensor cores; W decoded once per token tile).

    ``config.split_k > 1`` splits the input dimension over that many programs per output tile (fp32
    partial sums, then one reduce kernel): enough programs to fill the GPU when the output is narrow."""
    _check(x, codes, codebooks, nbits)
    cfg = config or MMConfig()
    x = x.contiguous()
    num_out, num_groups, num_cb = codes.shape
    parts, g = _parts(codebooks, part_sizes, num_out)
    if cfg.block_g * g < 16:
        raise ValueError("tl.dot needs BLOCK_K = block_g * in_group_size >= 16")
    if cfg.split_k < 1:
        raise ValueError(f"split_k={cfg.split_k} must be >= 1")
    codes_l, packed, word_bits, stride_cn = _codes_view(codes, nbits)
    tokens = x.shape[0]
    out = torch.empty(tokens, num_out, dtype=x.dtype, device=x.device)
    if tokens == 0:
        return out
    # whole BLOCK_G tiles per split, so no tile straddles two splits
    k_tiles = triton.cdiv(num_groups, cfg.block_g)
    split_k = min(cfg.split_k, k_tiles)
    groups_per_split = triton.cdiv(k_tiles, split_k) * cfg.block_g
    split_k = triton.cdiv(num_groups, groups_per_split)
    part = torch.empty(tokens, split_k, num_out, dtype=torch.float32, device=x.device) if split_k > 1 else out
    grid = (triton.cdiv(tokens, cfg.block_m) * triton.cdiv(num_out, cfg.block_n), split_k)
    _cb_mm_kernel[grid](
        x,
        codes_l,
        codebooks.contiguous(),
        scales.reshape(-1).contiguous(),
        bias if bias is not None else scales,
        out,
        part,
        tokens,
        num_out,
        num_groups,
        groups_per_split,
        x.stride(0),
        out.stride(0),
        stride_cn,
        part.stride(0),
        part.stride(1) if split_k > 1 else 0,
        **parts,
        NUM_CODEBOOKS=num_cb,
        NBITS=nbits,
        G=g,
        PACKED=packed,
        WORD_BITS=word_bits,
        HAS_BIAS=bias is not None,
        IEEE=x.dtype == torch.float32,
        SPLIT_K=split_k,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_G=cfg.block_g,
        GROUP_M=cfg.group_m,
        DECODE_2D=cfg.decode_2d,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if split_k > 1:
        _reduce_parts(part, scales, bias, out)
    return out


def _reduce_parts(part: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """``out[t, n] = scales[n] * sum_s part[t, s, n] + bias[n]`` (the split-K epilogue)."""
    tokens, splits, num_out = part.shape
    block_n = 256
    _splitk_reduce_kernel[(triton.cdiv(num_out, block_n), tokens)](
        part,
        scales.reshape(-1).contiguous(),
        bias if bias is not None else scales,
        out,
        num_out,
        splits,
        part.stride(0),
        part.stride(1),
        out.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK_N=block_n,
        BLOCK_S=min(64, triton.next_power_of_2(splits)),
        num_warps=4,
    )


def codebook_dequant(
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    nbits: int,
    dtype: torch.dtype,
    config: DequantConfig | None = None,
    part_sizes: list[int] | None = None,
) -> torch.Tensor:
    """Dense scaled ``W [N, K]`` in ``dtype`` (a transient copy for cuBLAS)."""
    if codebooks.shape[-2] != 1:
        raise ValueError("the Triton kernels need out_group_size == 1")
    cfg = config or DequantConfig()
    num_out, num_groups, num_cb = codes.shape
    parts, g = _parts(codebooks, part_sizes, num_out)
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
        **parts,
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
    part_sizes: list[int] | None = None,
) -> torch.Tensor:
    """Transient dense W (Triton dequant) + cuBLAS: the prefill path where it beats ``codebook_mm``."""
    _check(x, codes, codebooks, nbits)
    w = codebook_dequant(codes, codebooks, scales, nbits, x.dtype, config, part_sizes)
    return torch.nn.functional.linear(x, w, bias.to(x.dtype) if bias is not None else None)


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for :func:`codebook_dense_chunked`'s dequant (created once: a stream per call
    would cost a driver call each time and cannot be created inside a CUDA-graph capture)."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


def codebook_dense_chunked(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    nbits: int,
    config: DequantConfig | None = None,
    chunk_rows: int = 2048,
    overlap: bool = True,
) -> torch.Tensor:
    """Prefill through cuBLAS with the dequant hidden behind it: W is dequantized ``chunk_rows`` rows at a time,
    and on a GPU (``overlap``) every chunk's dequant runs on a side stream while cuBLAS multiplies the chunks
    already done on the caller's stream, each product landing in its chunk's output columns (a strided cuBLAS
    output, no copy). Why: at 2048 tokens cuBLAS is compute-bound and the dequant memory-bound (about 40 of
    300 us on 11008x4096), so run one after the other (:func:`codebook_dense`) the dequant adds its whole time,
    and run side by side only the first chunk's. Without ``overlap`` (and on the CPU) the chunks run in turn.
    Works inside a CUDA-graph capture (the side stream forks from and joins the caller's).

    Measured, not dispatched (``bench/results/prefill_overlap_h100.json``): the overlap did not happen. cuBLAS's
    GEMM holds every SM, so the side stream's dequant waits for it, and the chunks' narrower GEMMs lose more than
    is hidden: at 2048 tokens 0.69-0.82x fp16 for 4 chunks against 0.73-0.83x for :func:`codebook_dense`."""
    _check(x, codes, codebooks, nbits)
    if codebooks.dim() != 4:
        raise ValueError("the chunked dense path takes one part's [M, 2**B, 1, G] codebooks")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows} must be >= 1")
    x = x.contiguous()
    num_out = codes.shape[0]
    out = torch.empty(x.shape[0], num_out, dtype=x.dtype, device=x.device)
    scales = scales.reshape(-1)
    bounds = [(start, min(start + chunk_rows, num_out)) for start in range(0, num_out, chunk_rows)]
    if not (overlap and x.is_cuda):
        for start, stop in bounds:
            w = codebook_dequant(codes[start:stop], codebooks, scales[start:stop], nbits, x.dtype, config)
            torch.mm(x, w.t(), out=out[:, start:stop])
    else:
        main, side = torch.cuda.current_stream(x.device), _side_stream(x.device)
        side.wait_stream(main)  # the codes, codebooks and scales as the caller's stream left them
        chunks = []
        with torch.cuda.stream(side):
            for start, stop in bounds:
                w = codebook_dequant(codes[start:stop], codebooks, scales[start:stop], nbits, x.dtype, config)
                done = torch.cuda.Event()
                done.record(side)
                chunks.append((start, stop, w, done))
        for start, stop, w, done in chunks:
            main.wait_event(done)
            torch.mm(x, w.t(), out=out[:, start:stop])
            w.record_stream(main)  # allocated on the side stream, last read on this one
        main.wait_stream(side)  # join (a graph capture needs it)
    if bias is not None:
        out += bias.to(x.dtype)
    return out
