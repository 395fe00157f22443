"""Kernel selection for :class:`lit_cb.layers.CodebookLinear`: by token count, format and device.

``select_kernel(fmt, x)`` returns a callable ``(x, codes, codebooks, scales, bias, fmt) -> y`` or None,
in which case the layer runs its PyTorch reference. The choice by token count comes from
``bench/kernel_bench.py --tune`` on the H100 (bench/results/kernels_h100.json), confirmed by the issue-10
sweep (bench/results/kernels_sweep_h100.json): the FMA matvec for the fewest tokens, the
decode-into-``tl.dot`` kernel where it beats the rest, and a transient dense W + cuBLAS beyond, where
cuBLAS's tensor-core pipeline outweighs writing and re-reading the dense copy.

``LIT_CB_SMEM_TABLES=1`` (opt-in, CUDA only, ignored under TRITON_INTERPRET) makes the ``gemv`` family run the
shared-memory-table prototype (lit_cb/kernels/smem_table.py), and the ``mm`` family its tensor-core variant
(lit_cb/kernels/smem_mm.py, 3-64 tokens), for the layers they take (1x8_g4, 2x8_g8-like, unfused); everything
else, and every call without the flag, runs as before.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator

import torch

# Best kernel family by token count, per format ("MxB_gG") with a default: a list of (max_tokens, algo),
# first match wins, "dense" beyond the last. The tile each family runs with is chosen per shape class in
# lit_cb/kernels/ops.py (GEMV_TILES, MM_DECODE_TILES, DEQUANT_TILES).
ALGO_TABLE: dict[str, list[tuple[int, str]]] = {
    "default": [(2, "gemv"), (64, "mm")],
    # bench/kernel_bench.py --tune, H100, 11008x4096 (bench/results/kernels_h100.json "tune"): mm is flat at
    # 55-70 us from 2 to 64 tokens; its 128-token tile (pipelined) loses to dense by 5x, so dense above 64.
    # The issue-10 sweep (bench/results/kernels_sweep_h100.json "layers") agrees on all four shapes: at 16
    # tokens mm (15-209 us) beats dense (27-410 us) and gemv (87-1590 us).
    "2x8_g8": [(2, "gemv"), (64, "mm")],
    "1x16_g8": [(1, "gemv"), (64, "mm")],
    "1x8_g4": [(2, "gemv"), (64, "mm")],
}
MAX_NUM_CODEBOOKS = 4
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_cpu_interpreter = False


@contextlib.contextmanager
def interpreter_on_cpu(enabled: bool = True) -> Iterator[None]:
    """Let CPU tensors reach the kernels under ``TRITON_INTERPRET=1`` (tests); never on by default,
    since the interpreter is orders of magnitude slower than the reference."""
    global _cpu_interpreter
    previous, _cpu_interpreter = _cpu_interpreter, enabled
    try:
        yield
    finally:
        _cpu_interpreter = previous


def _device_ok(x: torch.Tensor) -> bool:
    if x.is_cuda:
        return True
    return _cpu_interpreter and x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def supports(fmt, x: torch.Tensor) -> bool:
    """Whether some kernel handles this format, dtype and device."""
    return (
        fmt.out_group_size == 1
        and fmt.num_codebooks <= MAX_NUM_CODEBOOKS
        and fmt.nbits_per_codebook <= 16
        and fmt.in_group_size & (fmt.in_group_size - 1) == 0  # power of two: tl.arange needs it
        and x.dtype in SUPPORTED_DTYPES
        and x.shape[-1] == fmt.in_features
        and _device_ok(x)
    )


def format_key(fmt) -> str:
    return f"{fmt.num_codebooks}x{fmt.nbits_per_codebook}_g{fmt.in_group_size}"


def choose_algo(fmt, tokens: int) -> str:
    """``gemv`` / ``mm`` / ``dense`` for a call with ``tokens`` rows of input."""
    for max_tokens, algo in ALGO_TABLE.get(format_key(fmt), ALGO_TABLE["default"]):
        if tokens <= max_tokens:
            return algo
    return "dense"


def select_kernel(fmt, x: torch.Tensor) -> Callable | None:
    """The kernel for this call, or None for the PyTorch reference (unsupported format or device)."""
    if not supports(fmt, x):
        return None
    from .ops import codebook_linear

    tokens = x.numel() // max(1, x.shape[-1])
    return functools.partial(codebook_linear, algo=choose_algo(fmt, tokens))
