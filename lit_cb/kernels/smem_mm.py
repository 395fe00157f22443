"""Prototype multi-token (2-64) codebook matmul on tensor cores with the codebooks staged in SHARED memory
(issue 10: batch 16 at >= 1.0x fp16). Opt-in only, like the gemv prototype: ``LIT_CB_SMEM_TABLES=1``
(:func:`lit_cb.kernels.smem_table.enabled`), never under TRITON_INTERPRET; :func:`lit_cb.kernels.codebook.
codebook_mm` runs otherwise.

Why: ``codebook_mm`` decodes each ``[BLOCK_N, BLOCK_K]`` W tile with codeword gathers from L1, the bound
measured at 16 tokens. Here the table of :mod:`lit_cb.kernels.smem_table` (``NCOPIES`` banked copies per
codeword) is staged once per persistent CTA, with the same asm, reservation, plan and barriers
(:func:`smem_table._setup_table`, :func:`smem_table.plan_for`), and every codeword of a tile is one
``ld.shared.v4/v2.b32`` (:func:`smem_table._gather`). The codebooks' codewords are summed in fp32, rounded to
the activation dtype and fed to ``tl.dot`` exactly as ``codebook_mm`` does; scales and bias are applied to
the fp32 accumulator.

Shared memory. ``tl.dot`` stages its operands through Triton's OWN shared memory inside the K loop (and the
epilogue may convert the accumulator's layout through it): all of that is Triton's allocation in the probe
compile, ``[0, probe_shared)``, and the table sits above it (HAZARD rule 2 of smem_table.py). Tiles are
chosen to keep that small: ``num_stages=1`` (a pipelined loop would add async copies, another writer), one
``tl.dot`` per K step. The reservation is a power of two, so a 64 KB 2x8 g8 table above a few KB of dot
staging reserves 128 KB: one CTA per SM on an H100 (227 KB), hence 8 warps by default there.

Persistent CTAs walk (row tile, token tile) pairs ``pid, pid + P, ...``, token tiles of a row tile adjacent so
that concurrently running CTAs share the W tile's codes in L2. No split-K in this prototype: a narrow output
(4096 rows / 64 = 64 row tiles at 16 tokens) leaves SMs idle, which the benchmark will show.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import smem_table as S
from .codebook import _codes_view, _load_codes, _num_sms


@dataclass(frozen=True)
class SmemMMConfig:
    """``block_m`` tokens x ``block_n`` rows per output tile, ``block_g`` groups per K step (``BLOCK_K =
    block_g * G``); ``ncopies`` as in :class:`smem_table.SmemGemvConfig`; ``ctas_per_sm`` caps the grid."""

    block_m: int = 16
    block_n: int = 64
    block_g: int = 16
    num_warps: int = 4
    ncopies: int | None = None
    ctas_per_sm: int = 4


def mm_config(tokens: int, group_size: int) -> SmemMMConfig:
    """A 16/32/64-token tile over 64 rows and 128 inputs per K step (the ``codebook_mm`` wide-class tile at 16
    tokens); 8 warps for 8-wide codewords, whose 128 KB reservation leaves one CTA per SM."""
    block_m = 16 if tokens <= 16 else (32 if tokens <= 32 else 64)
    warps = 8 if group_size == 8 else 4
    return SmemMMConfig(block_m=block_m, block_n=64, block_g=max(1, 128 // group_size), num_warps=warps)


def supports(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, nbits: int) -> bool:
    """The gemv prototype's formats (fp16/bf16 4/8-wide codewords, uint8 codes, one part) and at most 64 tokens."""
    return x.dim() == 2 and x.shape[0] <= 64 and S.supports(x, codes, codebooks, nbits)


@triton.jit
def _codeword_tile(cw, G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``[BLOCK_N, BLOCK_K]`` from the gather's G ``[BLOCK_N, BLOCK_G]`` tensors: element ``g * G + j`` is
    ``cw[j][:, g]``. Nested ``tl.join`` puts the new axis in each thread's registers (no layout conversion,
    so nothing of Triton's in shared memory); the last join adds the lowest bit of ``j``."""
    if G == 8:
        lo = tl.join(tl.join(cw[0], cw[4]), tl.join(cw[2], cw[6]))  # [.., p, q] = cw[4p + 2q]
        hi = tl.join(tl.join(cw[1], cw[5]), tl.join(cw[3], cw[7]))  # [.., p, q] = cw[4p + 2q + 1]
    else:
        lo = tl.join(cw[0], cw[2])
        hi = tl.join(cw[1], cw[3])
    return tl.reshape(tl.join(lo, hi), [BLOCK_N, BLOCK_K])


@triton.jit
def _decode_tile_smem(
    codes_ptr,
    cb_ptr,
    base,
    offs_n,
    offs_g,
    mask,
    stride_cn,
    NUM_CODEBOOKS: tl.constexpr,
    NBITS: tl.constexpr,
    G: tl.constexpr,
    PACKED: tl.constexpr,
    WORD_BITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NCOPIES: tl.constexpr,
    GATHER_ASM: tl.constexpr,
    GATHER_CONS: tl.constexpr,
    EMULATE: tl.constexpr,
):
    """Unscaled fp32 ``[BLOCK_N, BLOCK_K]`` W tile: the sum over codebooks of codewords gathered from the table."""
    CB_BYTES: tl.constexpr = (1 << NBITS) * NCOPIES * 2 * G  # one codebook's part of the table
    w = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for m in tl.static_range(NUM_CODEBOOKS):
        c = _load_codes(codes_ptr, offs_n, offs_g, mask, stride_cn, m, NUM_CODEBOOKS, NBITS, PACKED, WORD_BITS)
        if EMULATE:
            cw = _gather_global(cb_ptr, c + m * (1 << NBITS), G)
        else:
            cw = S._gather(c, base + m * CB_BYTES, G, GATHER_ASM, GATHER_CONS)
        w += _codeword_tile(cw, G, BLOCK_N, BLOCK_K)
    return w


@triton.jit
def _gather_global(cb_ptr, entries, G: tl.constexpr):
    """The interpreter's stand-in for :func:`smem_table._gather` (``EMULATE``): the same G-tuple of fp32
    codewords, loaded from the codebooks in global memory, so the CPU tests run everything but the asm."""
    if G == 8:
        return (
            tl.load(cb_ptr + entries * G + 0).to(tl.float32),
            tl.load(cb_ptr + entries * G + 1).to(tl.float32),
            tl.load(cb_ptr + entries * G + 2).to(tl.float32),
            tl.load(cb_ptr + entries * G + 3).to(tl.float32),
            tl.load(cb_ptr + entries * G + 4).to(tl.float32),
            tl.load(cb_ptr + entries * G + 5).to(tl.float32),
            tl.load(cb_ptr + entries * G + 6).to(tl.float32),
            tl.load(cb_ptr + entries * G + 7).to(tl.float32),
        )
    else:
        return (
            tl.load(cb_ptr + entries * G + 0).to(tl.float32),
            tl.load(cb_ptr + entries * G + 1).to(tl.float32),
            tl.load(cb_ptr + entries * G + 2).to(tl.float32),
            tl.load(cb_ptr + entries * G + 3).to(tl.float32),
        )


@triton.jit
def _cb_mm_smem_kernel(
    x_ptr,
    codes_ptr,
    cb_ptr,
    scales_ptr,
    bias_ptr,
    out_ptr,
    T,
    N,
    K_GROUPS,
    NUM_TILES,
    stride_xt,
    stride_ot,
    stride_cn,
    NUM_CODEBOOKS: tl.constexpr,
    NBITS: tl.constexpr,
    G: tl.constexpr,
    PACKED: tl.constexpr,
    WORD_BITS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
    NCOPIES: tl.constexpr,
    TABLE_OFF: tl.constexpr,
    RESERVE_WORDS: tl.constexpr,
    ACQUIRE_ASM: tl.constexpr,
    GATHER_ASM: tl.constexpr,
    GATHER_CONS: tl.constexpr,
    LOAD_ASM: tl.constexpr,
    LOAD_CONS: tl.constexpr,
    STORE_ASM: tl.constexpr,
    STORE_CONS: tl.constexpr,
    EMULATE: tl.constexpr,
):
    """out = (x @ W'^T) * scales + bias; grid (persistent programs,): each program stages the table once, then
    walks output tiles ``pid, pid + P, ...`` (tile = row tile * token tiles + token tile)."""
    BLOCK_K: tl.constexpr = BLOCK_G * G
    pid = tl.program_id(0)
    if EMULATE:  # the interpreter (tests): no table, codewords from global memory
        base = pid * 0
    else:
        base = S._setup_table(
            cb_ptr,
            pid + N,
            NUM_CODEBOOKS << NBITS,
            G,
            NCOPIES,
            RESERVE_WORDS,
            ACQUIRE_ASM,
            LOAD_ASM,
            LOAD_CONS,
            STORE_ASM,
            STORE_CONS,
        )
    num_pid_m = tl.cdiv(T, BLOCK_M)
    offs_kk = tl.arange(0, BLOCK_K)
    for tile in range(pid, NUM_TILES, tl.num_programs(0)):
        offs_m = (tile % num_pid_m) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = (tile // num_pid_m) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < T
        n_mask = offs_n < N
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xt
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for kg in range(0, K_GROUPS, BLOCK_G):
            offs_g = kg + tl.arange(0, BLOCK_G)
            offs_k = kg * G + offs_kk
            xt = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & (offs_k < K_GROUPS * G)[None, :], other=0.0)
            mask = n_mask[:, None] & (offs_g < K_GROUPS)[None, :]
            w = _decode_tile_smem(
                codes_ptr,
                cb_ptr,
                base,
                offs_n,
                offs_g,
                mask,
                stride_cn,
                NUM_CODEBOOKS,
                NBITS,
                G,
                PACKED,
                WORD_BITS,
                BLOCK_N,
                BLOCK_K,
                NCOPIES,
                GATHER_ASM,
                GATHER_CONS,
                EMULATE,
            )
            acc = tl.dot(xt, tl.trans(w.to(xt.dtype)), acc)
        acc = acc * tl.load(scales_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_ot + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


EMULATED_PLAN = {"TABLE_OFF": 0, "RESERVE_WORDS": 0, "ACQUIRE_ASM": S.PROBE_ACQUIRE_ASM}


def kernel_args(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    nbits: int,
    out: torch.Tensor,
    cfg: SmemMMConfig,
) -> tuple[tuple, dict]:
    """Positional runtime arguments and constexprs of :func:`_cb_mm_smem_kernel` (all but the plan's)."""
    num_out, num_groups, num_cb = codes.shape
    g = codebooks.shape[-1]
    codes_l, packed, word_bits, stride_cn = _codes_view(codes, nbits)
    tiles = triton.cdiv(x.shape[0], cfg.block_m) * triton.cdiv(num_out, cfg.block_n)
    scales = scales.reshape(-1)
    args = (x, codes_l, codebooks, scales, bias if bias is not None else scales, out)
    args += (x.shape[0], num_out, num_groups, tiles, x.stride(0), out.stride(0), stride_cn)
    kwargs = dict(
        NUM_CODEBOOKS=num_cb,
        NBITS=nbits,
        G=g,
        PACKED=packed,
        WORD_BITS=word_bits,
        HAS_BIAS=bias is not None,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_G=cfg.block_g,
        **S.table_constexprs(g, cfg.ncopies or S.default_ncopies(g), codebooks.dtype == torch.bfloat16),
        EMULATE=False,
        num_warps=cfg.num_warps,
        num_stages=1,  # a pipelined loop would add async copies into Triton's shared memory
    )
    return args, kwargs


def _prepare(x, codes, codebooks, scales, bias, nbits, cfg) -> tuple[tuple, dict]:
    x, codebooks = x.contiguous(), S._aligned(codebooks)
    out = torch.empty(x.shape[0], codes.shape[0], dtype=x.dtype, device=x.device)
    return kernel_args(x, codes, codebooks, scales.contiguous(), bias, nbits, out, cfg)


def shared_plan(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    nbits: int,
    config: SmemMMConfig | None = None,
) -> S.SharedPlan:
    """The shared-memory plan :func:`codebook_mm_smem` launches this call with (benchmarks record it)."""
    cfg = config or mm_config(x.shape[0], codebooks.shape[-1])
    args, kwargs = _prepare(x, codes, codebooks, scales, bias, nbits, cfg)
    return S.plan_for(_cb_mm_smem_kernel, args, kwargs, x.device)


def codebook_mm_smem(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    nbits: int,
    config: SmemMMConfig | None = None,
) -> torch.Tensor:
    """``x [T, K] -> [T, N]`` (2 < T <= 64) decoding W tiles from a shared-memory table into ``tl.dot``."""
    if not supports(x, codes, codebooks, nbits):
        raise ValueError("the smem-table mm takes <= 64 tokens of fp16/bf16 1x8_g4 / 2x8_g8-like layers, uint8 codes")
    if codes.shape[1] * codebooks.shape[-1] != x.shape[-1]:
        raise ValueError(f"x has {x.shape[-1]} features, codes expect {codes.shape[1] * codebooks.shape[-1]}")
    cfg = config or mm_config(x.shape[0], codebooks.shape[-1])
    if cfg.block_g * codebooks.shape[-1] < 16 or cfg.block_m < 16:
        raise ValueError("tl.dot needs block_m >= 16 and BLOCK_K = block_g * in_group_size >= 16")
    args, kwargs = _prepare(x, codes, codebooks, scales, bias, nbits, cfg)
    out = args[5]
    if x.shape[0] == 0:
        return out
    if os.environ.get("TRITON_INTERPRET") == "1":  # no PTX: everything but the table (tests/test_smem_mm.py)
        _cb_mm_smem_kernel[(min(args[9], cfg.ctas_per_sm),)](*args, **{**kwargs, "EMULATE": True}, **EMULATED_PLAN)
        return out
    plan = S.plan_for(_cb_mm_smem_kernel, args, kwargs, x.device)
    programs = min(args[9], S.resident_ctas(plan, cfg.ctas_per_sm) * _num_sms(x.device))
    _cb_mm_smem_kernel[(programs,)](*args, **kwargs, **plan.constexprs())
    return out
