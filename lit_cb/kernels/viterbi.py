"""Triton Viterbi search for the trellis quantizer: :func:`lit_cb.trellis.viterbi` with its time loop inside one kernel.

Why it exists: the PyTorch :func:`~lit_cb.trellis.viterbi` runs each of the ``T`` steps of a walk as about ten
small ops (a min over the predecessors, an argmin, a backpointer store, the new squared errors, ...), so on a GPU
it is bound by kernel launches, not arithmetic: about 51 s per transformer block on an H100 at ``L = 12, k = 2``
with 32 x 8 tiles. Here one program searches one row (a tile's walk) from the first step to the backtrace, so a
whole call is one launch whatever ``T`` is. On an H100 (bench/viterbi_bench.py, L = 12, k = 2, T = 256) a call takes
0.10-0.40 ms for 6-896 rows against 37-60 ms in PyTorch, and a 576 x 576 layer quantizes in 0.04 s instead of 3.5 s.

Per program: the cost of every state, ``2**L`` float32, lives in registers as a ``[2**k, 2**(L-k)]`` tensor (state
``s = p * 2**(L-k) + m``, ``p`` its top ``k`` bits). A step takes the min over ``p`` (the predecessors of
``s' = m * 2**k + b`` are the ``2**k`` states with low bits ``m``), stores its argmin as a uint8 backpointer to a
global scratch ``[N, T, 2**(L-k)]``, and adds the step's (weighted) squared errors as a ``[2**(L-k), 2**k]``
tensor whose flat order is ``s'``; the reshape back to ``[2**k, 2**(L-k)]`` is the next step's view. After the last
step, the argmin of the cost is the last state and a scalar loop walks the backpointers back to the first.

The arithmetic is that of the PyTorch reference, op for op, in float32 and compiled without FMA contraction, so
each state's cost is bit-identical and the walks agree except where two costs tie exactly (the tie may break the
other way; the objective is then the same).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from lit_cb.kernels.dispatch import _device_ok

MAX_STATE_BITS = 16  # 2**16 costs per program: far past what registers hold (they spill), but still correct
MAX_FAN_BITS = 8  # backpointers are uint8


def _num_warps(num_states: int) -> int:
    """Warps per program: 8 at L = 12 (16 costs and 16 values per thread, 48 registers, no spills on sm_90 by
    cuobjdump -res-usage). On an H100 (bench/viterbi_bench.py, T = 256) 8 warps beat 4 by about 10% up to 344
    rows a call and tie at 896; 16 ran 3-7x slower."""
    return max(1, min(8, num_states // 512))


@triton.jit
def _viterbi_kernel(
    x_ptr,  # [N, T] float32, contiguous
    values_ptr,  # [2**L] float32
    d_ptr,  # [T] float32 (read only with HAS_WEIGHTS)
    back_ptr,  # [N, T, LOW] uint8 scratch
    states_ptr,  # [N, T] int64 out
    T,
    K: tl.constexpr,  # bits per step
    STATE_BITS: tl.constexpr,  # L
    FAN: tl.constexpr,  # 2**k
    LOW: tl.constexpr,  # 2**(L-k)
    HAS_WEIGHTS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * T
    back_row = back_ptr + row * T * LOW
    out_row = states_ptr + row * T
    m = tl.arange(0, LOW)
    b = tl.arange(0, FAN)
    vals = tl.load(values_ptr + m[:, None] * FAN + b[None, :])  # [LOW, FAN]: state m * FAN + b
    diff = tl.load(x_row) - vals
    err = diff * diff
    if HAS_WEIGHTS:
        err = tl.load(d_ptr) * err
    cost = tl.reshape(err, (FAN, LOW))  # [p, m]: state p * LOW + m
    # x_t and d_t of the next step are loaded one step ahead, so their latency hides behind a step's work
    x_next = tl.load(x_row + 1, mask=T > 1, other=0.0)
    d_next = 1.0
    if HAS_WEIGHTS:
        d_next = tl.load(d_ptr + 1, mask=T > 1, other=0.0)
    for t in range(1, T):
        x_t = x_next
        d_t = d_next
        x_next = tl.load(x_row + t + 1, mask=t + 1 < T, other=0.0)
        if HAS_WEIGHTS:
            d_next = tl.load(d_ptr + t + 1, mask=t + 1 < T, other=0.0)
        best, arg = tl.min(cost, axis=0, return_indices=True)  # [LOW]: the best predecessor of each m
        tl.store(back_row + t * LOW + m, arg.to(tl.uint8))
        diff = x_t - vals
        err = diff * diff
        if HAS_WEIGHTS:
            err = d_t * err
        cost = tl.reshape(best[:, None] + err, (FAN, LOW))  # flat order m * FAN + b is the new state
    # the last state: the argmin over (p, m) in two steps, not through a flat reshape (Triton 3.9's TTIR marked
    # that reshape allow_reorder, which would break the pairing of costs with their flat indices)
    best, arg = tl.min(cost, axis=0, return_indices=True)
    m_last = tl.argmin(best, axis=0)
    p_last = tl.sum(tl.where(m == m_last, arg, 0), axis=0)
    s = (p_last.to(tl.int64) << (STATE_BITS - K)) | m_last.to(tl.int64)
    tl.store(out_row + T - 1, s)
    tl.debug_barrier()  # the backpointers other threads stored are visible to every thread from here
    for i in range(1, T):
        t = T - i
        m_prev = s >> K
        p = tl.load(back_row + t * LOW + m_prev).to(tl.int64)
        s = m_prev | (p << (STATE_BITS - K))
        tl.store(out_row + t - 1, s)


def supports(x: torch.Tensor) -> bool:
    """Whether :func:`viterbi_walks` can run on ``x``: float32 on a CUDA device, or on the CPU under the Triton
    interpreter inside :func:`lit_cb.kernels.dispatch.interpreter_on_cpu` (tests). Anything else should go to
    :func:`lit_cb.trellis.viterbi`."""
    return x.dtype == torch.float32 and _device_ok(x)


def viterbi_walks(
    x: torch.Tensor,
    values: torch.Tensor,
    k: int,
    prev: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    *,
    num_warps: int | None = None,
) -> torch.Tensor:
    """The walks ``[N, T]`` (int64) minimising ``sum_t d_t (x_t - values[s_t])**2`` per row of ``x``, as
    :func:`lit_cb.trellis.viterbi` (the same signature, so it can stand in for it) but in one kernel launch.

    ``x``: ``[N, T]`` float32; ``values``: ``[2**L]`` (cast to float32 on ``x``'s device, as the reference does);
    ``k``: bits per step, ``1 <= k < L``, ``k`` dividing ``L``, ``k <= 8``; ``weights``: ``d``, ``[T]`` or None
    (all ones). ``prev`` (a forced predecessor of the first state) is not supported: it must be None.
    ``num_warps``: warps per program (default :func:`_num_warps`), for benchmarks.
    Temporary memory: ``N * T * 2**(L-k)`` bytes of backpointers."""
    if prev is not None:
        raise ValueError("viterbi_walks supports only prev=None (a free first state); use lit_cb.trellis.viterbi")
    if not isinstance(x, torch.Tensor) or x.ndim != 2:
        raise ValueError(f"x must be a [N, T] tensor, got {getattr(x, 'shape', type(x))}")
    if x.dtype != torch.float32:
        raise ValueError(f"x must be float32, got {x.dtype}")
    if not supports(x):
        raise ValueError(
            f"x on {x.device} is not supported: a CUDA tensor, or a CPU one under TRITON_INTERPRET=1 inside "
            "lit_cb.kernels.dispatch.interpreter_on_cpu()"
        )
    n, t_len = x.shape
    if t_len < 1:
        raise ValueError(f"x must have at least one step (T >= 1), got shape {tuple(x.shape)}")
    if not isinstance(values, torch.Tensor) or values.ndim != 1:
        raise ValueError(f"values must be a 1-D [2**L] tensor, got {getattr(values, 'shape', type(values))}")
    num_states = values.numel()
    state_bits = int(math.log2(num_states)) if num_states > 0 else -1
    if num_states < 2 or 2**state_bits != num_states or state_bits > MAX_STATE_BITS:
        raise ValueError(f"values must hold 2**L entries with 1 <= L <= {MAX_STATE_BITS}, got {num_states}")
    if isinstance(k, bool) or not isinstance(k, int) or not (1 <= k < state_bits) or state_bits % k:
        raise ValueError(f"k={k!r} must be an int with 1 <= k < L={state_bits} and k dividing L")
    if k > MAX_FAN_BITS:
        raise ValueError(f"k={k} > {MAX_FAN_BITS}: the backpointers are uint8")
    dev = x.device
    values = values.to(dev, torch.float32).contiguous()
    if weights is not None:
        if not isinstance(weights, torch.Tensor) or weights.shape != (t_len,):
            raise ValueError(f"weights must be a [T] = [{t_len}] tensor, got {getattr(weights, 'shape', weights)}")
        d = weights.to(dev, torch.float32).contiguous()
    else:
        d = values  # never read (HAS_WEIGHTS is off); any float32 pointer will do
    states = torch.empty(n, t_len, dtype=torch.int64, device=dev)
    if n == 0:
        return states
    x = x.contiguous()
    low = num_states >> k
    back = torch.empty(n, t_len, low, dtype=torch.uint8, device=dev)
    _viterbi_kernel[(n,)](
        x,
        values,
        d,
        back,
        states,
        t_len,
        K=k,
        STATE_BITS=state_bits,
        FAN=2**k,
        LOW=low,
        HAS_WEIGHTS=weights is not None,
        num_warps=_num_warps(num_states) if num_warps is None else num_warps,
        enable_fp_fusion=False,  # d * (x - v)**2 + best rounded as the reference rounds it
    )
    return states
