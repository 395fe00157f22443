"""Triton kernels for :class:`lit_cb.trellis.InputRotation`: the trellis layer's input rotation in one or two
launches instead of PyTorch's five or six.

Why: on an H100 the trellis decode kernel reads a 4096 x 4096 layer in 12.8 µs at one token, and the rotation
in PyTorch (a cast, the signs, two Hadamard-factor matmuls, the mix, a cast back) took another 14-22 µs
(bench/results/trellis_kernel_v2_h100.json): more than the weights. Here one program per (token, group) applies
the signs and the Walsh-Hadamard transform of its ``p`` inputs as ``log2(p)`` butterfly stages in registers
(``a + b``, ``a - b`` on pairs ``h`` apart: Sylvester's order, the same ``H_p`` as the PyTorch path), and,
when the width has more than one group, a second launch mixes the groups (``y_i = sum_j mix[j, i] z_j``, one
tensor-core MMA per block of positions, ``tf32x3``: see MIX_PRECISION). Both compute in float32, as the PyTorch
path does, and write ``x``'s dtype.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

if TYPE_CHECKING:
    from lit_cb.trellis import InputRotation

MAX_GROUP = 4096  # InputRotation's largest Hadamard group: one program's p values in registers
# the butterflies use tl.split / tl.join / tl.permute (Triton 3.0+); an older Triton leaves the rotation to PyTorch
HAS_TRITON_FEATURES = all(hasattr(tl, name) for name in ("split", "join", "permute"))
MAX_GROUPS = 64  # the mix is one [groups, groups] MMA operand per program (43 groups for LLaMA-7B's 11008 = 43 x 256)
# How the mix multiplies. "ieee" (exact fp32 on CUDA cores) took 55 µs a token at 43 groups on the H100 against
# PyTorch's 24 (trellis_kernel_v3_h100.json), so it was limited to 16 groups. "tf32x3" splits each fp32 operand into
# a TF32 high part and a TF32 low part and adds three tensor-core products (hi*hi + hi*lo + lo*hi): about fp32's
# accuracy (the dropped lo*lo term is 2**-22 relative) at tensor-core speed. MIX_BLOCK positions per program: 8
# programs a token for the 256-input groups of 11008, where the ieee version ran 4.
MIX_PRECISION = "tf32x3"
MIX_BLOCK = 32


@triton.jit
def _signs_hadamard_kernel(
    x_ptr,  # [T, N] input
    signs_ptr,  # [N] float32, +-1
    out_ptr,  # [T, N]: the output (one group) or float32 scratch for the mix
    N,
    P: tl.constexpr,
    LOG_P: tl.constexpr,
    SCALE: tl.constexpr,  # 1 / sqrt(P)
):
    t = tl.program_id(0)
    g = tl.program_id(1)
    idx = tl.arange(0, P)
    offs = t.to(tl.int64) * N + g * P + idx
    v = tl.load(x_ptr + offs).to(tl.float32) * tl.load(signs_ptr + g * P + idx)
    for stage in tl.static_range(LOG_P):  # pairs (i, i + h), h = 2**stage, bit h of i clear: (a + b, a - b)
        pairs = tl.permute(tl.reshape(v, (P // (2 << stage), 2, 1 << stage)), (0, 2, 1))
        a, b = tl.split(pairs)
        v = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 2, 1)), (P,))
    tl.store(out_ptr + offs, (v * SCALE).to(out_ptr.dtype.element_ty))


@triton.jit
def _mix_kernel(
    z_ptr,  # [T, N] float32: every group after signs and Hadamard
    mix_ptr,  # [M, M] float32
    out_ptr,  # [T, N]
    N,
    P,
    M,
    M_PAD: tl.constexpr,  # M rounded up to a power of two, at least 16 (tl.dot)
    BLOCK: tl.constexpr,  # positions per program
    PRECISION: tl.constexpr,  # tl.dot's input_precision (MIX_PRECISION)
):
    t = tl.program_id(0)
    c = tl.program_id(1)
    i = tl.arange(0, M_PAD)
    pos = c * BLOCK + tl.arange(0, BLOCK)
    z_ok = (i[:, None] < M) & (pos[None, :] < P)
    row = t.to(tl.int64) * N
    z = tl.load(z_ptr + row + i[:, None] * P + pos[None, :], mask=z_ok, other=0.0)  # [j, pos]
    mix_t = tl.load(mix_ptr + i[None, :] * M + i[:, None], mask=(i[:, None] < M) & (i[None, :] < M), other=0.0)
    y = tl.dot(mix_t, z, input_precision=PRECISION)  # y[i, pos] = sum_j mix[j, i] z[j, pos]
    tl.store(out_ptr + row + i[:, None] * P + pos[None, :], y.to(out_ptr.dtype.element_ty), mask=z_ok)


def supports(rot: InputRotation, x: torch.Tensor) -> bool:
    """Whether the kernels take this rotation and input: a Triton with the ops they use, a Hadamard group of at most
    :data:`MAX_GROUP` and at most :data:`MAX_GROUPS` groups, a float dtype, and a device the kernels run on (a GPU,
    or the CPU under the interpreter in tests)."""
    from lit_cb.kernels.dispatch import _device_ok

    return (
        HAS_TRITON_FEATURES
        and rot.p <= MAX_GROUP
        and rot.m <= MAX_GROUPS
        and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and x.shape[-1] == rot.n
        and _device_ok(x)
    )


def rotate(x: torch.Tensor, rot: InputRotation) -> torch.Tensor:
    """``x R`` (``rot``: an :class:`lit_cb.trellis.InputRotation`) in ``x``'s dtype, computed in float32."""
    if not supports(rot, x):
        raise ValueError(
            f"the rotation kernels do not take n={rot.n} ({rot.m} groups of {rot.p}) with {tuple(x.shape)} "
            f"{x.dtype} on {x.device}; they take groups of at most {MAX_GROUP}, at most {MAX_GROUPS} groups, "
            "float16/bfloat16/float32 inputs of width n, on a GPU (or the CPU under the interpreter)"
        )
    flat = x.reshape(-1, rot.n).contiguous()
    tokens = flat.shape[0]
    out = torch.empty_like(flat)
    if tokens == 0:
        return out.reshape(x.shape)
    signs, _, mix = rot._parts(torch.empty(0, device=x.device, dtype=torch.float32))
    first = out if rot.m == 1 else torch.empty(flat.shape, device=x.device, dtype=torch.float32)
    _signs_hadamard_kernel[(tokens, rot.m)](
        flat,
        signs,
        first,
        rot.n,
        P=rot.p,
        LOG_P=int(math.log2(rot.p)),
        SCALE=1.0 / math.sqrt(rot.p),
        num_warps=max(1, min(8, rot.p // 256)),
    )
    if rot.m > 1:
        block = max(16, min(MIX_BLOCK, rot.p))
        _mix_kernel[(tokens, triton.cdiv(rot.p, block))](
            first,
            mix.contiguous(),
            out,
            rot.n,
            rot.p,
            rot.m,
            M_PAD=max(16, triton.next_power_of_2(rot.m)),
            BLOCK=block,
            PRECISION=MIX_PRECISION,
        )
    return out.reshape(x.shape)
