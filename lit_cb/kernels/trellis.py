"""Triton matvec for :class:`lit_cb.trellis.TrellisLinear`: weights decoded from their codes with integer
ops only, no table and no gather (issue 10's computed-codes route).

Layout the kernel reads (:func:`pack_tile_words`): each tile's symbols as one MSB-first bit stream in
``WORDS`` uint32 words (stored as int32), symbol ``j`` at stream bits ``[k*j, k*(j+1))``. State ``t`` of the
tile is the ``L``-bit window starting at stream bit ``k*t``; with ``32 / k`` states starting in each word,
state ``t = (32/k) * w + s`` lies in the 64 bits of words ``w`` and ``w + 1``: it is the top ``L`` bits of the
funnel shift ``(word[w] << k*s) | (word[w+1] >> (32 - k*s))``. So a program loads each tile's words twice as two
contiguous vectors (offset by one word) and shifts in 32-bit registers: coalesced loads, no per-weight gather.
That is what the codebook kernels could not get past (L1 gathers of codewords, ``bench/README.md``).

The value of a state is the hash of :func:`lit_cb.trellis.computed_values` (one multiply-add mod 2**32, a
byte sum), scaled by the row's scale; the kernel multiplies it into the rotated input ``x R`` (the rotation
runs before, in PyTorch). Each program owns one row tile (``tile_rows`` rows) and a range of column blocks
(split-K when the output is narrow); it decodes each tile once for all of the (up to 16) tokens.

Why it is shaped so: decoding is integer work, and on an H100 an fp16 matvec streams weights at about
3 TB/s, so a computed code wins only with a few instructions per weight. The first version (64-bit shifts,
masked byte extraction, an int-to-float conversion, a per-block row reduction) ran at 0.13-0.34x fp16
(bench/results/trellis_kernel_h100.json); this one spends a funnel shift, a shift, a multiply-add, a ``dp4a``
byte sum, an OR, a subtraction and an FMA per weight, and reduces rows once per program.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from lit_cb.trellis import HASH_ADD, HASH_MUL, TrellisFormat

_SD = math.sqrt(4 * (256**2 - 1) / 12)
MAX_TOKENS = 16
TILES_PER_PROGRAM = 8  # row tiles per program: 8 x 16 words = 128 lanes (4 warps), one word each
MMA_TILES_PER_PROGRAM = 4  # the tensor-core kernel's: 1.2-1.4x faster than 8 at 16 tokens on the H100, 4 warps
# (trellis_kernel_v5_h100.json "program_sweep": 40.5 / 82.5 / 83.3 / 241.7 µs against 51.9 / 99.9 / 101.9 / 330.7)
MMA_MIN_TOKENS = 9  # fp16 input with more tokens than one FMA launch takes goes to the tensor-core kernel: on the
# H100 it is 2.4-2.7x slower than the FMA kernel at 4 tokens and 1.4-2.4x faster at 16 (trellis_kernel_v3_h100.json)
TOKENS_PER_LAUNCH = 8  # each thread keeps 16 states x tokens accumulators: 8 tokens fit in 168 registers on
# sm_90 (cuobjdump -res-usage), 16 spill, so more tokens are taken 8 at a time


def supports(fmt: TrellisFormat) -> bool:
    """Formats the kernel takes: k dividing 32, the states starting in one word a whole number (a power of two)
    of tile rows, so a state's column is its place in the word; tile columns and words per tile powers of two
    (``tl.arange``); L <= 32."""
    k = fmt.bits_per_step
    if 32 % k or (32 // k) % fmt.tile_cols:
        return False
    halves = (32 // k) // fmt.tile_cols

    def pow2(n: int) -> bool:
        return n >= 1 and n & (n - 1) == 0

    return (
        fmt.tile_rows % halves == 0
        and pow2(halves)
        and pow2(fmt.tile_cols)
        and pow2(fmt.tile_rows // halves)
        and fmt.state_bits <= 32
        and fmt.tile_cols >= 2
    )


def _refusal(fmt: TrellisFormat) -> str:
    return (
        f"the trellis kernel does not take {fmt}: it takes bits_per_step k dividing 32 with 32 / k a power-of-two "
        "multiple of tile_cols, tile_cols and tile_rows / (32 / k / tile_cols) powers of two, and state_bits <= 32"
    )


def use_ptx(x: torch.Tensor) -> bool:
    """Inline PTX (``shf.l.wrap``, ``dp4a``) on an NVIDIA GPU; the plain integer ops elsewhere (the interpreter,
    which cannot run PTX, and other backends). ``LIT_CB_TRELLIS_PTX=0`` turns it off (the bench compares)."""
    return x.is_cuda and torch.version.cuda is not None and os.environ.get("LIT_CB_TRELLIS_PTX", "1") != "0"


def words_per_tile(fmt: TrellisFormat) -> int:
    """Words holding a tile's stream, plus one so that the last state's second word exists."""
    return fmt.steps * fmt.bits_per_step // 32 + 1


def pack_tile_words(symbols: torch.Tensor, fmt: TrellisFormat) -> torch.Tensor:
    """``[num_tiles, symbols_per_tile]`` uint8 symbols -> ``[num_tiles, words_per_tile]`` int32: each tile's
    symbols as an MSB-first stream (zero-padded)."""
    k, n_words = fmt.bits_per_step, words_per_tile(fmt)
    per_word = 32 // k
    sym = torch.zeros(symbols.shape[0], n_words * per_word, dtype=torch.int64, device=symbols.device)
    sym[:, : symbols.shape[1]] = symbols.long()
    shifts = torch.tensor([32 - k * (i + 1) for i in range(per_word)], device=symbols.device)
    words = (sym.reshape(symbols.shape[0], n_words, per_word) << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


# 8388608.0 + n has the bit pattern 0x4B000000 | n for 0 <= n < 2**23: a byte sum becomes a float with one OR
# and one subtraction (exact), not an int-to-float conversion (a quarter-rate instruction on sm_90).
_MAGIC_BITS = 0x4B000000
_MAGIC_MINUS_MEAN = 8388608.0 + 510.0


@triton.jit
def _state_windows(hi, lo, sh, PTX: tl.constexpr):
    """The 32 stream bits starting ``sh`` bits into ``hi`` (then ``lo``): ``(hi << sh) | (lo >> (32 - sh))``, a
    funnel shift (one ``shf.l.wrap`` with ``PTX``; ``sh`` < 32)."""
    if PTX:
        return tl.inline_asm_elementwise(
            "shf.l.wrap.b32 $0, $1, $2, $3;", "=r,r,r,r", [lo, hi, sh], dtype=tl.uint32, is_pure=True, pack=1
        )
    else:
        return (hi << sh) | ((lo >> 1) >> (31 - sh))


@triton.jit
def _byte_sum(h, PTX: tl.constexpr):
    """The sum of the 4 bytes of ``h`` (uint32): one ``dp4a`` against 0x01010101 with ``PTX``; else two byte
    pairs summed in 16-bit lanes, then the lanes by a multiply (their sum, at most 1020, lands in bits 16-31)."""
    if PTX:
        return tl.inline_asm_elementwise(
            "{\n.reg .u32 ones, zero;\nmov.u32 ones, 16843009;\nmov.u32 zero, 0;\ndp4a.u32.u32 $0, $1, ones, zero;\n}",
            "=r,r",
            [h],
            dtype=tl.uint32,
            is_pure=True,
            pack=1,
        )
    else:
        t = (h & 0x00FF00FF) + ((h >> 8) & 0x00FF00FF)
        return (t * 0x10001) >> 16


@triton.jit
def _decode(
    hi,
    lo,
    sh,
    STATE_BITS: tl.constexpr,
    MUL: tl.constexpr,
    ADD: tl.constexpr,
    MAGIC_BITS: tl.constexpr,
    MAGIC_MINUS_MEAN: tl.constexpr,
    PTX: tl.constexpr,
):
    """The value (float32, before the row scale and ``1 / sd``) of the state starting ``sh`` bits into word ``hi``
    (then ``lo``): its byte-sum hash minus 510, an exact integer in [-510, 510]."""
    state = _state_windows(hi, lo, sh, PTX) >> (32 - STATE_BITS)
    total = _byte_sum(state * MUL + ADD, PTX)  # uint32 arithmetic wraps mod 2**32, as the hash asks
    return (total | MAGIC_BITS).to(tl.float32, bitcast=True) - MAGIC_MINUS_MEAN


@triton.jit
def _block_values(
    words_ptr,
    b,
    ROW_TILES,
    word_off,
    q_ok,
    sh,
    WORDS: tl.constexpr,
    HALVES: tl.constexpr,
    TILE_COLS: tl.constexpr,
    Q: tl.constexpr,
    STATE_BITS: tl.constexpr,
    MUL: tl.constexpr,
    ADD: tl.constexpr,
    MAGIC_BITS: tl.constexpr,
    MAGIC_MINUS_MEAN: tl.constexpr,
    PTX: tl.constexpr,
):
    """Column block ``b``'s values as ``[HALVES, TILE_COLS, Q]`` (lane ``q`` loads its word and the next once, then
    decodes the word's states in registers): the step the FMA matvec and the dequantize kernels share."""
    base = words_ptr + b.to(tl.int64) * ROW_TILES * WORDS + word_off
    hi = tl.load(base, mask=q_ok, other=0, eviction_policy="evict_first").to(tl.uint32, bitcast=True)
    lo = tl.load(base + 1, mask=q_ok, other=0, eviction_policy="evict_first").to(tl.uint32, bitcast=True)
    hi3 = tl.broadcast_to(hi[None, None, :], (HALVES, TILE_COLS, Q))
    lo3 = tl.broadcast_to(lo[None, None, :], (HALVES, TILE_COLS, Q))
    return _decode(hi3, lo3, sh, STATE_BITS, MUL, ADD, MAGIC_BITS, MAGIC_MINUS_MEAN, PTX)


@triton.jit
def _trellis_gemv_kernel(
    x_ptr,  # [M, IN] rotated input (fp16/bf16/fp32)
    words_ptr,  # [NUM_TILES, WORDS] int32
    scales_ptr,  # [OUT] row scales
    out_ptr,  # [M, OUT] float32, zeroed (atomic adds across split-K programs)
    M,
    IN,
    OUT,
    ROW_TILES,
    BLOCKS_PER_PROGRAM,
    WORDS: tl.constexpr,
    TILE_ROWS: tl.constexpr,
    TILE_COLS: tl.constexpr,
    STATE_BITS: tl.constexpr,
    K: tl.constexpr,
    HALVES: tl.constexpr,  # tile rows whose states start in one word: (32 // K) // TILE_COLS
    N_WORDS: tl.constexpr,  # words whose states are used: TILE_ROWS // HALVES
    TILES_PER_PROGRAM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    MUL: tl.constexpr,
    ADD: tl.constexpr,
    INV_SD: tl.constexpr,
    MAGIC_BITS: tl.constexpr,
    MAGIC_MINUS_MEAN: tl.constexpr,
    PTX: tl.constexpr,
):
    """Each program: ``TILES_PER_PROGRAM`` row tiles, ``BLOCKS_PER_PROGRAM`` column blocks. A block's states are
    held as ``[HALVES, TILE_COLS, Q]`` with ``Q`` = every word of every row tile the program owns (the last, the
    lanes' axis): word ``w`` of a tile holds rows ``w * HALVES + h``, state ``(h, c)`` at stream bit
    ``K * (h * TILE_COLS + c)`` of it. So each thread loads its two words once per block and decodes all of their
    states in registers, the input's ``TILE_COLS`` values are shared by every lane, the products accumulate
    elementwise, and rows are summed once, after the loop. Per weight: a funnel shift, a shift, a multiply-add
    (the hash), a byte sum, an OR and a subtraction (to float), and one FMA per token."""
    g = tl.program_id(0)
    split = tl.program_id(1)
    Q: tl.constexpr = TILES_PER_PROGRAM * N_WORDS
    q = tl.arange(0, Q)
    tile = g * TILES_PER_PROGRAM + q // N_WORDS
    w = q % N_WORDS
    q_ok = tile < ROW_TILES
    word_off = (tile * WORDS + w).to(tl.int64)
    h_idx = tl.arange(0, HALVES)
    c_idx = tl.arange(0, TILE_COLS)
    sh = (K * (h_idx[:, None] * TILE_COLS + c_idx[None, :])).to(tl.uint32)  # [HALVES, TILE_COLS]
    sh = tl.broadcast_to(sh[:, :, None], (HALVES, TILE_COLS, Q))
    m_idx = tl.arange(0, BLOCK_M)
    m_ok = m_idx < M
    acc = tl.zeros((BLOCK_M, HALVES, TILE_COLS, Q), dtype=tl.float32)
    b_start = split * BLOCKS_PER_PROGRAM
    n_blocks = IN // TILE_COLS
    for i in range(BLOCKS_PER_PROGRAM):
        b = b_start + i
        if b < n_blocks:
            val = _block_values(
                words_ptr, b, ROW_TILES, word_off, q_ok, sh,
                WORDS, HALVES, TILE_COLS, Q, STATE_BITS, MUL, ADD, MAGIC_BITS, MAGIC_MINUS_MEAN, PTX,
            )  # fmt: skip
            xs = tl.load(x_ptr + m_idx[:, None] * IN + b * TILE_COLS + c_idx[None, :], mask=m_ok[:, None], other=0.0)
            acc += val[None, :, :, :] * xs.to(tl.float32)[:, None, :, None]
    sums = tl.sum(acc, axis=2)  # [BLOCK_M, HALVES, Q]
    rows = tile[None, :] * TILE_ROWS + w[None, :] * HALVES + h_idx[:, None]  # [HALVES, Q]
    row_scale = tl.load(scales_ptr + rows, mask=q_ok[None, :], other=0.0).to(tl.float32) * INV_SD
    ok = m_ok[:, None, None] & q_ok[None, None, :]
    tl.atomic_add(out_ptr + m_idx[:, None, None] * OUT + rows[None, :, :], sums * row_scale[None, :, :], mask=ok)


@triton.jit
def _trellis_mma_kernel(
    x_ptr,  # [M, IN] rotated input, fp16
    words_ptr,  # [NUM_TILES, WORDS] int32
    scales_ptr,  # [OUT] row scales
    out_ptr,  # [M, OUT] float32, zeroed (atomic adds across split-K programs)
    M,
    IN,
    OUT,
    ROW_TILES,
    PAIRS_PER_PROGRAM,
    WORDS: tl.constexpr,
    TILE_ROWS: tl.constexpr,
    TILE_COLS: tl.constexpr,
    STATE_BITS: tl.constexpr,
    K: tl.constexpr,
    HALVES: tl.constexpr,
    N_WORDS: tl.constexpr,
    TILES_PER_PROGRAM: tl.constexpr,
    MUL: tl.constexpr,
    ADD: tl.constexpr,
    INV_SD: tl.constexpr,
    MAGIC_BITS: tl.constexpr,
    MAGIC_MINUS_MEAN: tl.constexpr,
    PTX: tl.constexpr,
):
    """2-16 tokens on tensor cores: the same decode as :func:`_trellis_gemv_kernel`, two column blocks at a time
    (``[HALVES, 2, TILE_COLS, Q]``, reshaped to ``[HALVES, 2 * TILE_COLS, Q]``: per h, k = input column and
    n = word), then one batched fp16 MMA of the ``[16, 2 * TILE_COLS]`` input into a ``[HALVES, 16, Q]`` fp32
    accumulator. The values are integers
    in [-510, 510], exact in fp16, so the products are exact and only the fp32 sums round; the decode is paid
    once for all tokens instead of one FMA per token and weight."""
    g = tl.program_id(0)
    split = tl.program_id(1)
    Q: tl.constexpr = TILES_PER_PROGRAM * N_WORDS
    q = tl.arange(0, Q)
    tile = g * TILES_PER_PROGRAM + q // N_WORDS
    q_ok = tile < ROW_TILES
    word_off = (tile * WORDS + q % N_WORDS).to(tl.int64)
    h_idx = tl.arange(0, HALVES)
    c_idx = tl.arange(0, TILE_COLS)
    j_idx = tl.arange(0, 2)
    # states as [HALVES, 2, TILE_COLS, Q] (q last: the lanes' axis, as in the FMA kernel, so a thread loads its
    # two words per block and decodes their states in registers); per h the [2 * TILE_COLS, Q] slab is the
    # (k = input column, n = word) operand of a batched MMA
    sh = (K * (h_idx[:, None] * TILE_COLS + c_idx[None, :])).to(tl.uint32)  # [HALVES, TILE_COLS]
    sh = tl.broadcast_to(sh[:, None, :, None], (HALVES, 2, TILE_COLS, Q))
    m_idx = tl.arange(0, 16)
    m_ok = m_idx < M
    k_idx = tl.arange(0, 2 * TILE_COLS)
    acc = tl.zeros((HALVES, 16, Q), dtype=tl.float32)
    n_blocks = IN // TILE_COLS
    b_start = split * 2 * PAIRS_PER_PROGRAM
    for i in range(PAIRS_PER_PROGRAM):
        b0 = b_start + 2 * i
        if b0 < n_blocks:
            bj = b0 + j_idx
            ok = (bj[:, None] < n_blocks) & q_ok[None, :]  # [2, Q]
            ptrs = words_ptr + bj.to(tl.int64)[:, None] * ROW_TILES * WORDS + word_off[None, :]
            hi = tl.load(ptrs, mask=ok, other=0, eviction_policy="evict_first").to(tl.uint32, bitcast=True)
            lo = tl.load(ptrs + 1, mask=ok, other=0, eviction_policy="evict_first").to(tl.uint32, bitcast=True)
            hi4 = tl.broadcast_to(hi[None, :, None, :], (HALVES, 2, TILE_COLS, Q))
            lo4 = tl.broadcast_to(lo[None, :, None, :], (HALVES, 2, TILE_COLS, Q))
            val = _decode(hi4, lo4, sh, STATE_BITS, MUL, ADD, MAGIC_BITS, MAGIC_MINUS_MEAN, PTX)
            w_t = tl.reshape(val, (HALVES, 2 * TILE_COLS, Q)).to(tl.float16)
            cols = b0 * TILE_COLS + k_idx
            xs = tl.load(  # [16 tokens, 2 * TILE_COLS]
                x_ptr + m_idx[:, None] * IN + cols[None, :], mask=m_ok[:, None] & (cols[None, :] < IN), other=0.0
            )
            acc = tl.dot(tl.broadcast_to(xs[None, :, :], (HALVES, 16, 2 * TILE_COLS)), w_t, acc)
    qn = tl.arange(0, Q)
    tile_n = g * TILES_PER_PROGRAM + qn // N_WORDS
    rows = tile_n[None, :] * TILE_ROWS + (qn % N_WORDS)[None, :] * HALVES + h_idx[:, None]  # [HALVES, Q]
    n_ok = tile_n < ROW_TILES
    row_scale = tl.load(scales_ptr + rows, mask=n_ok[None, :], other=0.0).to(tl.float32) * INV_SD
    ok = m_ok[None, :, None] & n_ok[None, None, :]
    out = acc * row_scale[:, None, :]
    tl.atomic_add(out_ptr + m_idx[None, :, None] * OUT + rows[:, None, :], out, mask=ok)


@triton.jit
def _trellis_dequant_kernel(
    words_ptr,  # [NUM_TILES, WORDS] int32
    scales_ptr,  # [OUT] row scales
    w_ptr,  # [IN, OUT] output: W_r^T in the rotated basis, scales applied
    OUT,
    ROW_TILES,
    WORDS: tl.constexpr,
    TILE_ROWS: tl.constexpr,
    TILE_COLS: tl.constexpr,
    STATE_BITS: tl.constexpr,
    K: tl.constexpr,
    HALVES: tl.constexpr,
    N_WORDS: tl.constexpr,
    TILES_PER_PROGRAM: tl.constexpr,
    MUL: tl.constexpr,
    ADD: tl.constexpr,
    INV_SD: tl.constexpr,
    MAGIC_BITS: tl.constexpr,
    MAGIC_MINUS_MEAN: tl.constexpr,
    PTX: tl.constexpr,
):
    """One column block of ``TILES_PER_PROGRAM`` row tiles per program: the same decode as the matvec kernels,
    times the row scale, written as ``W_r^T[col, row]`` (for many tokens, where a dense matmul of the decoded
    weight beats decoding per token and nothing is kept between calls). Transposed because the lanes own rows:
    a warp's store then spans 64 consecutive rows of one column (4 sectors), not 32 rows of ``W_r`` (32 sectors)."""
    g = tl.program_id(0)
    b = tl.program_id(1)
    Q: tl.constexpr = TILES_PER_PROGRAM * N_WORDS
    q = tl.arange(0, Q)
    tile = g * TILES_PER_PROGRAM + q // N_WORDS
    w = q % N_WORDS
    q_ok = tile < ROW_TILES
    h_idx = tl.arange(0, HALVES)
    c_idx = tl.arange(0, TILE_COLS)
    sh = (K * (h_idx[:, None] * TILE_COLS + c_idx[None, :])).to(tl.uint32)
    sh = tl.broadcast_to(sh[:, :, None], (HALVES, TILE_COLS, Q))
    word_off = (tile * WORDS + w).to(tl.int64)
    val = _block_values(
        words_ptr, b, ROW_TILES, word_off, q_ok, sh,
        WORDS, HALVES, TILE_COLS, Q, STATE_BITS, MUL, ADD, MAGIC_BITS, MAGIC_MINUS_MEAN, PTX,
    )  # fmt: skip
    rows = tile[None, :] * TILE_ROWS + w[None, :] * HALVES + h_idx[:, None]  # [HALVES, Q]
    scale = tl.load(scales_ptr + rows, mask=q_ok[None, :], other=0.0).to(tl.float32) * INV_SD
    cols = b * TILE_COLS + c_idx
    ptrs = w_ptr + cols[None, :, None].to(tl.int64) * OUT + rows[:, None, :]
    tl.store(ptrs, (val * scale[:, None, :]).to(w_ptr.dtype.element_ty), mask=q_ok[None, None, :])


def default_split_k(fmt: TrellisFormat, on_gpu: bool, tiles_per_program: int = TILES_PER_PROGRAM) -> int:
    """Programs per row tile: enough for about 8,192 programs (the sweep in bench/results/trellis_kernel_h100.json:
    at one token, time falls until 4,096-28,672 programs), each keeping at least 16 column blocks."""
    if not on_gpu:
        return 1
    row_tiles = fmt.out_features // fmt.tile_rows
    n_blocks = fmt.in_features // fmt.tile_cols
    groups = -(-row_tiles // tiles_per_program)
    return max(1, min(-(-4096 // groups), n_blocks // 16))


def _common(fmt: TrellisFormat, words: torch.Tensor, ptx: bool, tiles_per_program: int) -> dict:
    """The constexprs both kernels take."""
    k = fmt.bits_per_step
    halves = (32 // k) // fmt.tile_cols
    return dict(
        WORDS=words.shape[1],
        TILE_ROWS=fmt.tile_rows,
        TILE_COLS=fmt.tile_cols,
        STATE_BITS=fmt.state_bits,
        K=k,
        HALVES=halves,
        N_WORDS=fmt.tile_rows // halves,
        TILES_PER_PROGRAM=tiles_per_program,
        MUL=HASH_MUL,
        ADD=HASH_ADD,
        INV_SD=1.0 / _SD,
        MAGIC_BITS=_MAGIC_BITS,
        MAGIC_MINUS_MEAN=_MAGIC_MINUS_MEAN,
        PTX=ptx,
    )


def trellis_gemv(
    x_rot: torch.Tensor,
    words: torch.Tensor,
    scales: torch.Tensor,
    fmt: TrellisFormat,
    split_k: int | None = None,
    num_warps: int = 4,
    ptx: bool | None = None,
    mma: bool | None = None,
    tiles_per_program: int | None = None,
) -> torch.Tensor:
    """``x_rot @ W_r^T`` (float32 ``[M, out]``) for ``M <= MAX_TOKENS`` rotated tokens ``[M, in]``; ``words`` from
    :func:`pack_tile_words`, ``scales`` ``[out]`` or ``[out, 1]``. ``split_k`` programs share each row tile's
    columns (default :func:`default_split_k`); ``ptx`` (default :func:`use_ptx`) picks the inline-PTX integer
    path; ``mma`` (default: fp16 input with at least :data:`MMA_MIN_TOKENS` tokens) the tensor-core kernel, which
    takes fp16 only; ``tiles_per_program`` (a power of two; default :data:`TILES_PER_PROGRAM`, or
    :data:`MMA_TILES_PER_PROGRAM` for the tensor-core kernel) and ``num_warps`` shape the programs (the bench
    sweeps them)."""
    if not supports(fmt):
        raise ValueError(_refusal(fmt))
    m, n_in = x_rot.shape
    if m > MAX_TOKENS or n_in != fmt.in_features:
        raise ValueError(f"x has shape {tuple(x_rot.shape)}; expected [<= {MAX_TOKENS}, {fmt.in_features}]")
    if mma is None:
        mma = x_rot.dtype == torch.float16 and m >= MMA_MIN_TOKENS
    if mma and x_rot.dtype != torch.float16:
        raise ValueError(f"the tensor-core trellis kernel takes fp16 input, not {x_rot.dtype}")
    row_tiles = fmt.out_features // fmt.tile_rows
    n_blocks = fmt.in_features // fmt.tile_cols
    if tiles_per_program is None:
        tiles_per_program = MMA_TILES_PER_PROGRAM if mma else TILES_PER_PROGRAM
    if tiles_per_program < 1 or tiles_per_program & (tiles_per_program - 1):
        raise ValueError(f"tiles_per_program must be a power of two, got {tiles_per_program}")
    groups = -(-row_tiles // tiles_per_program)
    if split_k is None:
        split_k = default_split_k(fmt, x_rot.is_cuda, tiles_per_program)
    per_program = -(-n_blocks // max(1, min(split_k, n_blocks)))
    if mma:
        per_program += per_program % 2  # whole pairs of column blocks
    split_k = -(-n_blocks // per_program)
    out = torch.zeros(m, fmt.out_features, dtype=torch.float32, device=x_rot.device)
    x_rot = x_rot.contiguous()
    scales = scales.reshape(-1).contiguous()
    const = _common(fmt, words, use_ptx(x_rot) if ptx is None else ptx, tiles_per_program)
    if mma:
        _trellis_mma_kernel[(groups, split_k)](
            x_rot,
            words,
            scales,
            out,
            m,
            n_in,
            fmt.out_features,
            row_tiles,
            per_program // 2,
            **const,
            num_warps=num_warps,
        )
        return out
    for t0 in range(0, m, TOKENS_PER_LAUNCH):
        chunk = min(TOKENS_PER_LAUNCH, m - t0)
        _trellis_gemv_kernel[(groups, split_k)](
            x_rot[t0 : t0 + chunk],
            words,
            scales,
            out[t0 : t0 + chunk],
            chunk,
            n_in,
            fmt.out_features,
            row_tiles,
            per_program,
            BLOCK_M=max(1, triton.next_power_of_2(chunk)),
            **const,
            num_warps=num_warps,
        )
    return out


def trellis_dequantize(
    words: torch.Tensor, scales: torch.Tensor, fmt: TrellisFormat, dtype: torch.dtype, ptx: bool | None = None
) -> torch.Tensor:
    """``W_r`` (``[out, in]`` in ``dtype``, a transposed view: the rotated-basis weight, row scales applied) decoded on
    the device from :func:`pack_tile_words`'s words, for calls with more tokens than the matvec kernels take.
    Nothing is kept: the layer's reference path caches a float32 copy of every weight, which a served model cannot
    afford."""
    if not supports(fmt):
        raise ValueError(_refusal(fmt))
    row_tiles = fmt.out_features // fmt.tile_rows
    w_t = torch.empty(fmt.in_features, fmt.out_features, dtype=dtype, device=words.device)
    const = _common(fmt, words, use_ptx(words) if ptx is None else ptx, TILES_PER_PROGRAM)
    grid = (-(-row_tiles // TILES_PER_PROGRAM), fmt.in_features // fmt.tile_cols)
    _trellis_dequant_kernel[grid](words, scales.reshape(-1).contiguous(), w_t, fmt.out_features, row_tiles, **const)
    return w_t.t()  # [out, in], a view: F.linear hands the transpose to the GEMM
