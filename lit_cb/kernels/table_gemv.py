"""A matvec through per-input lookup tables kept in global memory (L1/L2), for codebook formats with B <= 8.

Why (issue 10): the default gemv (:mod:`lit_cb.kernels.codebook`) is bound by L1, not HBM. Each lane gathers
a whole codeword (8-16 bytes) from a 2-8 KB codebook at a random code, so a warp-wide gather touches about 24
32-byte sectors (Nsight Compute, ``kernel_counters_h100.json``), and L1 runs at 75-83% of its peak while DRAM
moves a sixth of what it could. Shared-memory tables fixed the sectors but not the residency
(``kernels_smem_h100.json``); a table gathered from registers (``codebook_lut_gemv``, ``tl.gather``) needed 168
registers. This kernel keeps the table in global memory and arranges the lanes so that one gather reads one
small window of it:

* **The table.** For each token and each code column ``c = group * M + m`` (the layout of a row's codes),
  ``table[t, c, k] = <codebooks[m, k, 0, :], x[t, group]>``: ``2**B`` values of one input group, 512 bytes in
  fp16 at B = 8. One small kernel builds it per call (``G * 2**B`` multiply-adds per code column: 2.8 M for a
  4096 x 11008 layer at 1x8 g4, against the matvec's 45 M) and writes it to L2 (0.5-1.4 MB).
* **The codes, interleaved.** ``[C / CHUNK, N, CHUNK]``: ``CHUNK`` (16) consecutive code columns of one row are
  one 16-byte vector, and the rows follow each other. A warp then loads 32 rows' vectors (512 contiguous
  bytes, coalesced), and each of its ``CHUNK`` gathers has all 32 lanes at the same code column, i.e. in the
  same 512-byte table window: at most 16 sectors, about 14 at random codes, for 4 (1x8 g4) or 8 (2x8 g8)
  weights a lane, where a codeword gather touches about 24 for as many weights. No multiply per weight either:
  a row's dot product is a sum of table values. A layer's codes are put in this layout once
  (:func:`interleave_codes`, kept by :func:`layer_codes`), as a serving format would store them. The gathers'
  tensors have the rows as their last axis, which is where Triton puts a warp's lanes when nothing else decides
  (``tests/test_ptx_loads.py`` reads the compiled layouts).
* **Split-K** over chunks of code columns, so that enough programs run: wide rows walk all of K, narrow ones
  (4096 x 11008) split it; partial sums (fp32) are reduced by :func:`lit_cb.kernels.codebook._reduce_parts`,
  deterministic, no atomics. With one split the scales and bias are applied in the same kernel.

The table costs precision: fp16 entries (about 11 bits) sum in fp32, like an fp16 GEMM's products.
``table_fp32`` keeps them in fp32 (1 KB windows, twice the sectors), as bf16 and fp32 inputs always do: their
group dots could overflow fp16.

Timed by ``bench/kernel_bench.py --sweep --sweep-families table`` (H100: ahead of the gemv only for several
codebooks at the huge shape class, 96.44 against 105.15 µs at 28672x8192 2x8_g8). The dispatcher sends ``gemv``
calls here where that sweep measured a win (``TABLE_GEMV_SHAPES`` in :mod:`lit_cb.kernels.ops`), or wherever
``LIT_CB_TABLE_GEMV=1`` asks (``0``: never; :func:`forced`), for the layers it takes, fused q/k/v and gate/up too
(:func:`supports`); each layer's codes are then interleaved once and kept beside them (:func:`layer_codes`:
another copy of the codes' bytes, 0.25 byte a weight at 2 bits).
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lit_cb.kernels.codebook import _num_sms, _part_offset, _parts, _reduce_parts

MAX_NBITS = 8  # 2**B table entries per code column: 512 bytes of fp16 at B = 8
CHUNKS = (16, 8, 4, 2, 1)  # code columns per lane vector, largest first: the largest that divides C is used
ENV_FLAG = "LIT_CB_TABLE_GEMV"
MAX_TOKENS = 4  # one table per token: past a few tokens the mm kernel reads the codes once for all of them


@dataclass(frozen=True)
class TableGemvConfig:
    """``block_n`` rows per program (32 lanes a warp over rows: ``32 * num_warps`` puts every lane on its own
    row), up to ``block_t`` tokens per program (their codes are loaded once), enough K splits that about
    ``programs_per_sm`` programs run per SM, fp16 or fp32 table entries. The chunk (code columns per lane
    vector) is the codes' layout (:func:`interleave_codes`), not a launch setting."""

    block_n: int = 128
    block_t: int = 4
    programs_per_sm: int = 4
    num_warps: int = 4
    table_fp32: bool = False


@triton.jit
def _table_build_kernel(
    x_ptr,
    cb_ptr,
    table_ptr,
    NUM_COLS,
    stride_xt,
    stride_tp,
    stride_tt,
    CB_PART_STRIDE: tl.constexpr,
    NUM_CODEBOOKS: tl.constexpr,
    NCODE: tl.constexpr,
    G: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """table[p, t, c, k] = sum_j codebooks[p, m, k, 0, j] * x[t, group * G + j], c = group * M + m; grid
    (cdiv(NUM_COLS, BLOCK_C), tokens, parts)."""
    t = tl.program_id(1)
    p = tl.program_id(2)
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < NUM_COLS
    grp = offs_c // NUM_CODEBOOKS
    m = offs_c % NUM_CODEBOOKS
    offs_k = tl.arange(0, NCODE)
    x_row = x_ptr + t.to(tl.int64) * stride_xt
    cb_part = cb_ptr + p * CB_PART_STRIDE
    acc = tl.zeros([BLOCK_C, NCODE], dtype=tl.float32)
    for j in tl.static_range(G):
        xv = tl.load(x_row + grp * G + j, mask=c_ok, other=0.0).to(tl.float32)
        w = tl.load(cb_part + (m[:, None] * NCODE + offs_k[None, :]) * G + j, mask=c_ok[:, None], other=0.0)
        acc += xv[:, None] * w.to(tl.float32)
    base = table_ptr + p.to(tl.int64) * stride_tp + t.to(tl.int64) * stride_tt
    tl.store(base + offs_c[:, None] * NCODE + offs_k[None, :], acc.to(table_ptr.dtype.element_ty), mask=c_ok[:, None])


@triton.jit
def _table_gemv_kernel(
    codes_ptr,
    table_ptr,
    scales_ptr,
    bias_ptr,
    part_ptr,
    out_ptr,
    N,
    TOKENS,
    NUM_CHUNKS,
    CHUNKS_PER_SPLIT,
    P1,
    P2,
    P3,
    stride_tp,
    stride_tt,
    stride_pt,
    stride_ps,
    stride_ot,
    NUM_PARTS: tl.constexpr,
    NBITS: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    DIRECT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """Rows [pid_n * BLOCK_N, +BLOCK_N) of tokens [pid_t * BLOCK_T, +BLOCK_T) over this split's chunks of code
    columns: the sum of table[t, c, code] over them, the codes loaded once for all the tile's tokens (rows of a
    fused layer's part p, from row P_p on, read the part's tables); DIRECT (one split): times scales, plus bias,
    into out; else into part[t, split, n]. Grid (cdiv(N, BLOCK_N), splits, cdiv(tokens, BLOCK_T))."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    NCODE: tl.constexpr = 1 << NBITS
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < TOKENS
    offs_j = tl.arange(0, CHUNK)
    row_part = _part_offset(offs_n, P1, P2, P3, NUM_PARTS, 1)  # the part index of each row
    # [BLOCK_T, 1, BLOCK_N]: each token's tables, each row's part. The rows are the LAST axis of every gather so
    # that Triton lays a warp's 32 lanes along them (contiguity ties put the last axis fastest): one code column,
    # hence one table window, per warp-wide gather (tests/test_ptx_loads.py checks the compiled layout)
    table_tn = (
        table_ptr
        + (offs_t.to(tl.int64) * stride_tt)[:, None, None]
        + (row_part.to(tl.int64) * stride_tp)[None, None, :]
    )
    mask = t_mask[:, None, None] & n_mask[None, None, :]
    b_start = pid_s * CHUNKS_PER_SPLIT
    b_end = tl.minimum(b_start + CHUNKS_PER_SPLIT, NUM_CHUNKS)
    acc = tl.zeros([BLOCK_T, CHUNK, BLOCK_N], dtype=tl.float32)
    for b in range(b_start, b_end):
        # [C / CHUNK, N, CHUNK]: a lane's CHUNK codes are one vector, consecutive lanes consecutive rows
        codes = tl.load(
            codes_ptr + (b * N + offs_n[:, None]) * CHUNK + offs_j[None, :],
            mask=n_mask[:, None],
            other=0,
            eviction_policy="evict_first",  # streamed once; the table is what should stay in L1
        )
        # the code column (b * CHUNK + j) picks one table window; the code, the entry in it
        entry = (b * CHUNK + offs_j[None, :]) * NCODE + (codes.to(tl.int32) & (NCODE - 1))  # [BLOCK_N, CHUNK]
        vals = tl.load(table_tn + tl.trans(entry)[None, :, :], mask=mask, other=0.0)  # [BLOCK_T, CHUNK, BLOCK_N]
        acc += vals.to(tl.float32)
    total = tl.sum(acc, axis=1)  # [BLOCK_T, BLOCK_N]
    tn_mask = t_mask[:, None] & n_mask[None, :]
    if DIRECT:
        total = total * tl.load(scales_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            total += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        dest = out_ptr + (offs_t.to(tl.int64) * stride_ot)[:, None] + offs_n[None, :]
        tl.store(dest, total.to(out_ptr.dtype.element_ty), mask=tn_mask)
    else:
        dest = part_ptr + (offs_t.to(tl.int64) * stride_pt)[:, None] + pid_s * stride_ps + offs_n[None, :]
        tl.store(dest, total, mask=tn_mask)


def chunk_for(num_cols: int, preferred: int = 16) -> int:
    """The largest of :data:`CHUNKS` up to ``preferred`` that divides ``num_cols`` (a row's code count)."""
    if preferred not in CHUNKS:
        raise ValueError(f"chunk={preferred}; expected one of {list(CHUNKS)}")
    return next(c for c in CHUNKS if c <= preferred and num_cols % c == 0)


def interleave_codes(codes: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """``[N, K_GROUPS, M]`` codes (uint8) as the kernel reads them: ``[C / chunk, N, chunk]`` with ``C =
    K_GROUPS * M`` the code columns of a row, ``chunk`` from :func:`chunk_for`. Same bytes, another order."""
    if codes.dim() != 3 or codes.dtype != torch.uint8:
        raise ValueError(f"codes must be [N, K_GROUPS, M] uint8, got {tuple(codes.shape)} {codes.dtype}")
    num_out, num_groups, num_cb = codes.shape
    cols = num_groups * num_cb
    chunk = chunk_for(cols, chunk)
    view = codes.reshape(num_out, cols // chunk, chunk).transpose(0, 1)
    # a copy always (a single chunk's transpose is already contiguous: a view would keep the codes alive)
    return torch.empty(view.shape, dtype=codes.dtype, device=codes.device).copy_(view)


def build_tables(x: torch.Tensor, codebooks: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """``[P, T, C, 2**B]`` tables of ``x [T, K]`` (module docstring), in ``dtype`` (fp16 or fp32): one per part of
    stacked ``[P, M, 2**B, 1, G]`` codebooks (a fused layer's), ``P = 1`` for ``[M, 2**B, 1, G]``."""
    stacked = codebooks if codebooks.dim() == 5 else codebooks.unsqueeze(0)
    num_parts, num_cb, ncode, _, g = stacked.shape
    tokens, k = x.shape
    cols = (k // g) * num_cb
    table = torch.empty(num_parts, tokens, cols, ncode, dtype=dtype, device=x.device)
    if tokens == 0:
        return table
    block_c = max(1, min(64, 4096 // ncode))  # about 4,096 accumulators a program
    _table_build_kernel[(triton.cdiv(cols, block_c), tokens, num_parts)](
        x,
        stacked.contiguous(),
        table,
        cols,
        x.stride(0),
        table.stride(0),
        table.stride(1),
        CB_PART_STRIDE=stacked[0].numel(),
        NUM_CODEBOOKS=num_cb,
        NCODE=ncode,
        G=g,
        BLOCK_C=block_c,
        num_warps=4,
    )
    return table


def _check(x: torch.Tensor, codes_il: torch.Tensor, codebooks: torch.Tensor, nbits: int) -> None:
    if not 1 <= nbits <= MAX_NBITS:
        raise ValueError(f"the table kernel needs 1 <= nbits_per_codebook <= {MAX_NBITS}, got {nbits}")
    if codebooks.dim() not in (4, 5) or codebooks.shape[-2] != 1 or codebooks.shape[-3] != 2**nbits:
        raise ValueError(
            f"codebooks must be [M, 2**nbits={2**nbits}, 1, G] or a fused layer's [P, M, 2**nbits, 1, G] "
            f"(out_group_size 1), got {tuple(codebooks.shape)}"
        )
    if codes_il.dim() != 3 or codes_il.dtype != torch.uint8:
        raise ValueError(f"codes must be interleaved [C / chunk, N, chunk] uint8 (interleave_codes), got "
                         f"{tuple(codes_il.shape)} {codes_il.dtype}")  # fmt: skip
    num_cb, g = codebooks.shape[-4], codebooks.shape[-1]
    cols = codes_il.shape[0] * codes_il.shape[2]
    if x.dim() != 2 or x.shape[1] % g or cols != (x.shape[1] // g) * num_cb:
        raise ValueError(
            f"x {tuple(x.shape)} and codes with {cols} code columns a row do not fit {num_cb} codebook(s) "
            f"of groups of {g}: expected {num_cb} x K / {g} columns"
        )
    if codes_il.numel() >= 2**31:
        raise ValueError("codes with >= 2**31 elements need 64-bit offsets, which this kernel does not use")


def table_gemv(
    x: torch.Tensor,
    codes_il: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    nbits: int,
    config: TableGemvConfig | None = None,
    part_sizes: list[int] | None = None,
    table: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [T, K] -> [T, N]``: ``out[t, n] = scales[n] * sum_k x[t, k] W'[n, k] + bias[n]`` through lookup tables.
    ``codes_il`` from :func:`interleave_codes`. Stacked ``[P, M, 2**B, 1, G]`` codebooks with ``part_sizes`` run a
    fused layer (rows of part p use codebooks[p], as :func:`lit_cb.kernels.codebook.codebook_gemv`). ``table``
    from :func:`build_tables` of the same ``x`` and codebooks (layers reading one input can share it), else built
    here."""
    _check(x, codes_il, codebooks, nbits)
    cfg = config or TableGemvConfig()
    x = x.contiguous()
    num_chunks, num_out, chunk = codes_il.shape
    parts, _ = _parts(codebooks, part_sizes, num_out)
    tokens = x.shape[0]
    out = torch.empty(tokens, num_out, dtype=x.dtype, device=x.device)
    if tokens == 0:
        return out
    if table is None:
        # fp16 entries for fp16 inputs; bf16 / fp32 inputs (a range fp16 may not hold) get fp32 ones
        wide = cfg.table_fp32 or x.dtype != torch.float16
        table = build_tables(x, codebooks, torch.float32 if wide else torch.float16)
    expect = (parts["NUM_PARTS"], tokens, num_chunks * chunk, 2**nbits)
    if tuple(table.shape) != expect:
        raise ValueError(f"table {tuple(table.shape)} does not fit this call: expected {expect}")
    row_tiles = triton.cdiv(num_out, cfg.block_n)
    block_t = min(triton.next_power_of_2(tokens), cfg.block_t)
    token_tiles = triton.cdiv(tokens, block_t)
    target = cfg.programs_per_sm * _num_sms(x.device)
    splits = max(1, min(num_chunks, triton.cdiv(target, row_tiles * token_tiles)))
    per_split = triton.cdiv(num_chunks, splits)
    splits = triton.cdiv(num_chunks, per_split)
    direct = splits == 1
    part = out if direct else torch.empty(tokens, splits, num_out, dtype=torch.float32, device=x.device)
    scales_flat = scales.reshape(-1).contiguous()
    _table_gemv_kernel[(row_tiles, splits, token_tiles)](
        codes_il,
        table,
        scales_flat,
        bias if bias is not None else scales_flat,
        part,
        out,
        num_out,
        tokens,
        num_chunks,
        per_split,
        parts["P1"],
        parts["P2"],
        parts["P3"],
        table.stride(0),
        table.stride(1),
        part.stride(0),
        part.stride(1) if not direct else 0,
        out.stride(0),
        NUM_PARTS=parts["NUM_PARTS"],
        NBITS=nbits,
        CHUNK=chunk,
        BLOCK_N=cfg.block_n,
        BLOCK_T=block_t,
        DIRECT=direct,
        HAS_BIAS=bias is not None,
        num_warps=cfg.num_warps,
    )
    if not direct:
        _reduce_parts(part, scales, bias, out)
    return out


# What the dispatcher launches (lit_cb/kernels/ops.py): the H100 sweep's best table variant on every cell it
# timed (results/table_sweep_h100.json: 11008x4096 and 28672x8192, batch 1, 1x8_g4 and 2x8_g8), 256 rows and 8
# warps a program, about 4 programs an SM, the codes in 8-column vectors
DISPATCH_CONFIG = TableGemvConfig(block_n=256, block_t=4, programs_per_sm=4, num_warps=8)
DISPATCH_CHUNK = 8


def forced() -> bool | None:
    """``LIT_CB_TABLE_GEMV``: ``1`` sends every gemv call the kernel takes to it, ``0`` none; unset (None), the
    dispatcher's measured shape rule decides (:func:`lit_cb.kernels.ops._table_gemv`)."""
    flag = os.environ.get(ENV_FLAG)
    if flag in (None, ""):
        return None
    if flag not in ("0", "1"):
        raise ValueError(f"{ENV_FLAG}={flag!r}; allowed: 1 (always), 0 (never), or unset (the measured default)")
    return flag == "1"


def supports(x2d: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, nbits: int) -> bool:
    """Layers (one part or fused) with uint8 codes ``[N, K_GROUPS, M]`` (B <= 8), up to :data:`MAX_TOKENS`
    tokens."""
    return (
        codebooks.dim() in (4, 5)
        and codes.dtype == torch.uint8
        and codes.dim() == 3
        and nbits <= MAX_NBITS
        and 0 < x2d.shape[0] <= MAX_TOKENS
    )


# id(codes) -> (codes._version, interleaved copy); an entry goes when its codes tensor is freed
_LAYER_CODES: dict[int, tuple[int, torch.Tensor]] = {}


def layer_codes(codes: torch.Tensor) -> torch.Tensor:
    """``codes`` interleaved (:func:`interleave_codes`), made on a layer's first call and kept until its codes
    change (version counter) or are freed, as :meth:`lit_cb.trellis.TrellisLinear.tile_words` keeps its layout.
    A CUDA-graph capture must come after one eager call, as ``lit_cb generate``'s warm-up does."""
    key = id(codes)
    hit = _LAYER_CODES.get(key)
    if hit is not None and hit[0] == codes._version:
        return hit[1]
    if hit is None:
        weakref.finalize(codes, _LAYER_CODES.pop, key, None)
    copy = interleave_codes(codes, DISPATCH_CHUNK)
    _LAYER_CODES[key] = (codes._version, copy)
    return copy
