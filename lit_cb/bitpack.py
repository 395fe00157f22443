"""Bit-packing of integer codes for storage: B-bit codes take B bits on disk, not 8 or 16.

In memory, codes stay one per uint8 (B <= 8) or int16 (B <= 16) element, the layout the kernels
read. A file written that way holds 8 bits per 3-bit code, so the bits/weight a report quotes would
not be what the file holds. The saved form is therefore this packed stream whenever B is not 8 or
16 (for those the in-memory dtype is already exact).

Layout (``pack_bits``): the codes, flattened in C order, form a little-endian bit stream. Code
``i`` occupies stream bits ``[i*B, (i+1)*B)``, least significant bit first; stream bit ``k`` is
bit ``k % 8`` (value ``2**(k % 8)``) of byte ``k // 8``. The stream is stored as a 1-D uint8
tensor of ``ceil(n*B / 8)`` bytes; the unused high bits of the last byte (the padded tail, at most
7 bits) are zero. Bytes (not wider words) keep the layout independent of the machine's byte
order and the padding below one byte.

Both directions are vectorised torch ops (on whatever device the tensor lives), processed in
chunks of a multiple of 8 codes (a whole number of bytes), so a 7B layer never materialises more
than a few tens of MB of bit planes at once.
"""

from __future__ import annotations

import torch

MIN_BITS, MAX_BITS = 1, 16
UNPACKED_WIDTHS = (8, 16)  # widths whose in-memory dtype (uint8, int16) already holds B bits per code
_CHUNK = 1 << 20  # codes per chunk; a multiple of 8, so every chunk is a whole number of bytes


def _check_nbits(nbits: int) -> None:
    if isinstance(nbits, bool) or not isinstance(nbits, int) or not MIN_BITS <= nbits <= MAX_BITS:
        raise ValueError(f"nbits={nbits!r} must be an integer in [{MIN_BITS}, {MAX_BITS}]")


def needs_packing(nbits: int) -> bool:
    """Whether codes of ``nbits`` bits are stored packed (every width but 8 and 16)."""
    _check_nbits(nbits)
    return nbits not in UNPACKED_WIDTHS


def packed_nbytes(count: int, nbits: int) -> int:
    """Bytes of the packed stream of ``count`` codes of ``nbits`` bits (the tail padded to a byte)."""
    _check_nbits(nbits)
    if count < 0:
        raise ValueError(f"count={count} must be >= 0")
    return (count * nbits + 7) // 8


def pack_bits(values: torch.Tensor, nbits: int) -> torch.Tensor:
    """Pack integer ``values`` (any shape, each in ``[0, 2**nbits)``; int16 values above 2**15 given
    as their two's complement are masked to 16 bits) into the 1-D uint8 stream described above."""
    _check_nbits(nbits)
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise TypeError(f"pack_bits takes integer codes, got {values.dtype}")
    flat = values.reshape(-1).to(torch.int32)
    if nbits == 16:
        flat = flat & 0xFFFF
    n = flat.numel()
    if n and (int(flat.min()) < 0 or int(flat.max()) >= 1 << nbits):
        raise ValueError(
            f"codes lie in [{int(flat.min())}, {int(flat.max())}], outside [0, {1 << nbits}) for nbits={nbits}"
        )
    out = torch.empty(packed_nbytes(n, nbits), dtype=torch.uint8, device=flat.device)
    shifts = torch.arange(nbits, dtype=torch.int32, device=flat.device)
    byte_weights = (1 << torch.arange(8, dtype=torch.int32, device=flat.device)).to(torch.int32)
    for start in range(0, n, _CHUNK):
        chunk = flat[start : start + _CHUNK]
        bits = ((chunk[:, None] >> shifts) & 1).reshape(-1)  # the chunk's stream, LSB first
        tail = -bits.numel() % 8
        if tail:  # only the last chunk can end inside a byte
            bits = torch.cat([bits, bits.new_zeros(tail)])
        packed = (bits.reshape(-1, 8) * byte_weights).sum(dim=1).to(torch.uint8)
        first = start * nbits // 8
        out[first : first + packed.numel()] = packed
    return out


def unpack_bits(packed: torch.Tensor, nbits: int, count: int) -> torch.Tensor:
    """The ``count`` codes (int64, 1-D) held by a stream written by :func:`pack_bits`."""
    _check_nbits(nbits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"a packed code stream is a 1-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    expected = packed_nbytes(count, nbits)
    if packed.numel() != expected:
        raise ValueError(
            f"a stream of {count} {nbits}-bit codes takes {expected} bytes, this one holds {packed.numel()}"
        )
    out = torch.empty(count, dtype=torch.int64, device=packed.device)
    shifts = torch.arange(nbits, dtype=torch.int32, device=packed.device)
    bit_pos = torch.arange(8, dtype=torch.int32, device=packed.device)
    for start in range(0, count, _CHUNK):
        stop = min(start + _CHUNK, count)
        first, last = start * nbits // 8, (stop * nbits + 7) // 8
        bits = ((packed[first:last].to(torch.int32)[:, None] >> bit_pos) & 1).reshape(-1)
        bits = bits[: (stop - start) * nbits].reshape(-1, nbits)
        out[start:stop] = (bits << shifts).sum(dim=1)
    return out
