"""Triton matvec for :class:`lit_cb.trellis.TrellisLinear`: weights decoded from their codes with integer
ops only, no table and no gather (issue 10's computed-codes route).

Layout the kernel reads (:func:`pack_tile_words`): each tile's symbols as one MSB-first bit stream in
``WORDS`` uint32 words (stored as int32), symbol ``j`` at stream bits ``[k*j, k*(j+1))``. State ``t`` of the
tile is the ``L``-bit window starting at stream bit ``k*t``; with ``32 / k`` states starting in each word,
state ``t = (32/k) * w + s`` lies in the 64 bits of words ``w`` and ``w + 1``:
``state = ((word[w] << 32 | word[w+1]) >> (64 - L - k*s)) & (2**L - 1)``. So a program loads each tile's words
twice as two contiguous vectors (offset by one word) and shifts: coalesced loads, no per-weight gather.
That is what the codebook kernels could not get past (L1 gathers of codewords, ``bench/README.md``).

The value of a state is the hash of :func:`lit_cb.trellis.computed_values` (one multiply-add mod 2**32, a
byte sum), scaled by the row's scale; the kernel multiplies it into the rotated input ``x R`` (the rotation
runs before, in PyTorch). Each program owns one row tile (``tile_rows`` rows) and a range of column blocks
(split-K when the output is narrow); it decodes each tile once for all of the (up to 16) tokens.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from lit_cb.trellis import HASH_ADD, HASH_MUL, TrellisFormat

_SD = math.sqrt(4 * (256**2 - 1) / 12)
MAX_TOKENS = 16


def supports(fmt: TrellisFormat) -> bool:
    """Formats the kernel takes: k dividing 32, a tile a whole number of words' states, L + 32 <= 64."""
    k = fmt.bits_per_step
    return 32 % k == 0 and fmt.steps % (32 // k) == 0 and fmt.state_bits <= 32 and fmt.tile_cols >= 2


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
    PER_WORD: tl.constexpr,  # states starting in one word: 32 // K
    N_WORDS: tl.constexpr,  # words whose states are used: TILE_ROWS * TILE_COLS // PER_WORD
    BLOCK_M: tl.constexpr,
    MUL: tl.constexpr,
    ADD: tl.constexpr,
    INV_SD: tl.constexpr,
):
    r = tl.program_id(0)
    split = tl.program_id(1)
    w_idx = tl.arange(0, N_WORDS)
    s_idx = tl.arange(0, PER_WORD)
    m_idx = tl.arange(0, BLOCK_M)
    c_idx = tl.arange(0, TILE_COLS)
    m_ok = m_idx < M
    shift = (64 - STATE_BITS - K * s_idx).to(tl.int64)
    acc = tl.zeros((BLOCK_M, TILE_ROWS), dtype=tl.float32)
    b_start = split * BLOCKS_PER_PROGRAM
    n_blocks = IN // TILE_COLS
    for i in range(BLOCKS_PER_PROGRAM):
        b = b_start + i
        if b < n_blocks:
            base = words_ptr + (b * ROW_TILES + r).to(tl.int64) * WORDS
            hi = tl.load(base + w_idx).to(tl.int64) & 0xFFFFFFFF
            lo = tl.load(base + w_idx + 1).to(tl.int64) & 0xFFFFFFFF
            v = (hi << 32) | lo  # [N_WORDS]
            state = (v[:, None] >> shift[None, :]) & ((1 << STATE_BITS) - 1)  # [N_WORDS, PER_WORD]: t = w*PER_WORD+s
            h = state.to(tl.uint32) * MUL + ADD  # uint32 arithmetic wraps mod 2**32, as the hash asks
            total = (h & 0xFF) + ((h >> 8) & 0xFF) + ((h >> 16) & 0xFF) + (h >> 24)
            val = (total.to(tl.int32) - 510).to(tl.float32) * INV_SD
            tile = tl.reshape(val, (TILE_ROWS, TILE_COLS))  # t = row * TILE_COLS + col
            xs = tl.load(
                x_ptr + m_idx[:, None] * IN + b * TILE_COLS + c_idx[None, :], mask=m_ok[:, None], other=0.0
            ).to(tl.float32)  # [BLOCK_M, TILE_COLS]
            acc += tl.sum(tile[None, :, :] * xs[:, None, :], axis=2)
    rows = r * TILE_ROWS + tl.arange(0, TILE_ROWS)
    acc = acc * tl.load(scales_ptr + rows).to(tl.float32)[None, :]
    tl.atomic_add(out_ptr + m_idx[:, None] * OUT + rows[None, :], acc, mask=m_ok[:, None])


def trellis_gemv(
    x_rot: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, fmt: TrellisFormat, split_k: int | None = None
) -> torch.Tensor:
    """``x_rot @ W_r^T`` (float32 ``[M, out]``) for ``M <= MAX_TOKENS`` rotated tokens ``[M, in]``; ``words`` from
    :func:`pack_tile_words`, ``scales`` ``[out]`` or ``[out, 1]``. ``split_k`` programs share each row tile's
    columns (default: enough to give the GPU about 4 programs per SM's worth of row tiles)."""
    if not supports(fmt):
        raise ValueError(f"the trellis kernel does not take {fmt}")
    m, n_in = x_rot.shape
    if m > MAX_TOKENS or n_in != fmt.in_features:
        raise ValueError(f"x has shape {tuple(x_rot.shape)}; expected [<= {MAX_TOKENS}, {fmt.in_features}]")
    row_tiles = fmt.out_features // fmt.tile_rows
    n_blocks = fmt.in_features // fmt.tile_cols
    if split_k is None:
        target = 528 if x_rot.is_cuda else 1  # about 4 programs per SM on an H100 (132 SMs)
        split_k = max(1, min(n_blocks, target // max(1, row_tiles)))
    per_program = -(-n_blocks // split_k)
    split_k = -(-n_blocks // per_program)
    out = torch.zeros(m, fmt.out_features, dtype=torch.float32, device=x_rot.device)
    k = fmt.bits_per_step
    _trellis_gemv_kernel[(row_tiles, split_k)](
        x_rot.contiguous(),
        words,
        scales.reshape(-1).contiguous(),
        out,
        m,
        n_in,
        fmt.out_features,
        row_tiles,
        per_program,
        WORDS=words.shape[1],
        TILE_ROWS=fmt.tile_rows,
        TILE_COLS=fmt.tile_cols,
        STATE_BITS=fmt.state_bits,
        K=k,
        PER_WORD=32 // k,
        N_WORDS=fmt.steps * k // 32,
        BLOCK_M=max(1, triton.next_power_of_2(m)),
        MUL=HASH_MUL,
        ADD=HASH_ADD,
        INV_SD=1.0 / _SD,
    )
    return out
