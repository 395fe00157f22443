"""The computed-codes trellis format: weights whose codewords are computed from the code, not looked up.

Why a second format: the codebook kernels are bound by gathers of codewords from L1 (issue 10), and a
value that integer ops compute from the code needs no table at all. The format is a bitshift trellis
(the idea of QTIP's computed codes, written here from its description):

* The weights are first rotated on the input side, ``W_r = W R`` (:class:`InputRotation`: random signs,
  then a Walsh-Hadamard transform within groups of ``p`` inputs and a seeded random orthogonal mix of
  the ``m = in/p`` groups). Rotated rows are close to Gaussian, which is what the values below imitate.
  The forward pass computes ``x W^T = (x R) W_r^T``, so the rotation is applied to the activations and
  never materialised as a dense ``[in, in]`` matrix.
* ``W_r`` is cut into tiles of ``tile_rows x tile_cols`` weights; a tile is one walk of ``T`` steps
  (row by row) through ``2**L`` states, each step shifting ``k`` new bits in:
  ``s_t = ((s_{t-1} << k) | b_t) mod 2**L``. Weight ``t`` of the tile is ``scale_row * v(s_t)``.
* ``v(s)`` is a hash (:func:`computed_values`): one multiply-add mod 2**32 and the sum of the four
  bytes, close to N(0, 1). No table is stored, so the format is ``k`` bits per weight, plus ``L - k``
  bits per tile for the first state and an fp16 scale per row.
* A tile is stored as its *symbols*: the ``L/k`` symbols of the first state (most significant first)
  then one ``k``-bit symbol per later step, so state ``t`` is the window of ``L/k`` symbols starting at
  symbol ``t`` (:func:`symbols_to_states`). On disk the symbols are bit-packed at ``k`` bits
  (:mod:`lit_cb.hf_quantizer`: the ``codes`` buffer with ``bits = k``).

The codes are found by the Viterbi algorithm (:func:`viterbi`, the exact least-squares walk) inside
block-LDLQ error feedback (:func:`block_ldlq`), by :mod:`lit_cb.quant.trellis`.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lit_cb.configs.trellis import check_walk_bits
from lit_cb.layers import CompressedLinear

HASH_MUL = 1664525  # the Numerical Recipes LCG: odd multiplier, full period mod 2**32
HASH_ADD = 1013904223


def computed_values(state_bits: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``v(s)`` for every state ``s < 2**L`` (float32): ``(sum of the 4 bytes of (HASH_MUL * s + HASH_ADD)
    mod 2**32 - 510) / sd``. Each byte is close to uniform on 0..255, so the sum has mean 510 and variance
    ``4 * (256**2 - 1) / 12``; a decode kernel computes the same with integer ops."""
    s = torch.arange(2**state_bits, dtype=torch.int64, device=device)
    x = (s * HASH_MUL + HASH_ADD) & 0xFFFFFFFF
    total = sum((x >> (8 * i)) & 0xFF for i in range(4))
    sd = math.sqrt(4 * (256**2 - 1) / 12)
    return ((total - 510).double() / sd).float()


def viterbi(
    x: torch.Tensor,
    values: torch.Tensor,
    k: int,
    prev: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The walk ``s_1..s_T`` (``[N, T]`` int64) minimising ``sum_t d_t (x_t - values[s_t])**2`` for each of the
    ``N`` rows of ``x`` (``[N, T]``; ``d`` = ``weights`` ``[T]``, or 1), over walks with
    ``s_t = ((s_{t-1} << k) | b) mod 2**L`` and a free first state, or with ``prev`` (``[N]``) a first state
    that steps from ``prev[n]``.

    State ``s = p * 2**(L-k) + m`` (``p`` its top ``k`` bits) steps to ``m * 2**k + b`` for every ``b``, so the
    predecessors of ``s'`` are the ``2**k`` states with low bits ``m = s' >> k``: the best of them is a min
    over the ``p`` axis of the cost viewed as ``[N, 2**k, 2**(L-k)]``."""
    n, t_len = x.shape
    dev = x.device
    values = values.to(dev, x.dtype)
    num_states = values.numel()
    fan = 2**k
    low = num_states // fan
    state_bits = int(math.log2(num_states))
    d = torch.ones(t_len, device=dev, dtype=x.dtype) if weights is None else weights.to(dev, x.dtype)
    cost = d[0] * (x[:, :1] - values[None, :]) ** 2
    if prev is not None:
        reachable = ((prev.to(dev)[:, None] << k) & (num_states - 1)) | torch.arange(fan, device=dev)[None, :]
        start = torch.full_like(cost, float("inf"))
        cost = start.scatter_(1, reachable, cost.gather(1, reachable))
    back = torch.empty(t_len, n, low, dtype=torch.uint8, device=dev)  # the best p for every (row, m) per step
    for t in range(1, t_len):
        best, arg = cost.view(n, fan, low).min(dim=1)
        back[t] = arg.to(torch.uint8)
        cost = best.repeat_interleave(fan, dim=1) + d[t] * (x[:, t : t + 1] - values[None, :]) ** 2
    states = torch.empty(n, t_len, dtype=torch.int64, device=dev)
    states[:, -1] = cost.argmin(dim=1)
    rows = torch.arange(n, device=dev)
    for t in range(t_len - 1, 0, -1):
        s = states[:, t]
        p = back[t, rows, s >> k].long()
        states[:, t - 1] = (s >> k) | (p << (state_bits - k))
    return states


def block_ldlq(
    target: torch.Tensor, u: torch.Tensor, block: int, code: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, list[float]]:
    """Code ``target`` (float64 ``[rows, n]``) ``block`` columns at a time with ``code`` (block in, coded block
    out), moving the later columns by ``-E U_BB^-1 U_B,rest`` after each block (``E`` = target_B - coded_B, both
    after earlier moves). Returns the coded matrix and each block's ``||E U_BB^-1||^2``: with ``H^-1 = U^T U``
    they sum to ``tr(dW H dW^T)`` for ``dW`` = original target - coded (an identity the tests check)."""
    target = target.clone()
    coded = torch.empty_like(target)
    parts = []
    for b0 in range(0, target.shape[1], block):
        b1 = min(b0 + block, target.shape[1])
        coded[:, b0:b1] = code(target[:, b0:b1])
        err = torch.linalg.solve_triangular(u[b0:b1, b0:b1], target[:, b0:b1] - coded[:, b0:b1], upper=True, left=False)
        parts.append(float(err.pow(2).sum()))
        target[:, b1:] -= err @ u[b0:b1, b1:]
    return coded, parts


def walk_to_symbols(states: torch.Tensor, state_bits: int, k: int) -> torch.Tensor:
    """``[N, T]`` walks -> ``[N, L/k - 1 + T]`` uint8 symbols: the first state's ``L/k`` symbols (most
    significant first), then each later state's newest ``k`` bits. Raises if a walk is not a trellis walk."""
    per_state = state_bits // k
    mask = (1 << k) - 1
    shifted = ((states[:, :-1] << k) | (states[:, 1:] & mask)) & ((1 << state_bits) - 1)
    if not torch.equal(shifted, states[:, 1:]):
        raise ValueError("the states are not a walk: s_t must be ((s_{t-1} << k) | b_t) mod 2**L")
    first = torch.stack([(states[:, 0] >> (k * (per_state - 1 - j))) & mask for j in range(per_state)], dim=1)
    return torch.cat([first, states[:, 1:] & mask], dim=1).to(torch.uint8)


def symbols_to_states(symbols: torch.Tensor, state_bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`walk_to_symbols`: state ``t`` is the window of ``L/k`` symbols from symbol ``t``."""
    per_state = state_bits // k
    sym = symbols.long()
    t_len = sym.shape[1] - per_state + 1
    states = torch.zeros(sym.shape[0], t_len, dtype=torch.int64, device=sym.device)
    for j in range(per_state):
        states = (states << k) | sym[:, j : j + t_len]
    return states


def _hadamard(p: int, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """The ``p x p`` Walsh-Hadamard matrix (Sylvester), scaled to be orthogonal; ``p`` a power of two."""
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(p)


class InputRotation:
    """An orthogonal ``R`` on ``n`` inputs, defined by ``(n, seed)`` alone (nothing is stored): random signs,
    then the Walsh-Hadamard transform within each of the ``m`` groups of ``p`` consecutive inputs (``p`` the
    largest power of two dividing ``n``, at most ``max_hadamard``), then a seeded random orthogonal ``m x m``
    mix across the groups. ``rotate(x) = x R`` and ``unrotate(y) = y R^T`` act on the last dimension."""

    def __init__(self, n: int, seed: int, max_hadamard: int = 4096) -> None:
        p = 1
        while n % (2 * p) == 0 and 2 * p <= max_hadamard:
            p *= 2
        self.n, self.p, self.m, self.seed = n, p, n // p, seed
        gen = torch.Generator().manual_seed(seed)
        # on the CPU whatever the default device (Lightning builds models under torch.device("cuda")), so that
        # (n, seed) gives one R everywhere
        self._signs = torch.randint(0, 2, (n,), generator=gen, device="cpu").double() * 2 - 1
        q, r = torch.linalg.qr(torch.randn(self.m, self.m, generator=gen, dtype=torch.float64, device="cpu"))
        self._mix = q * torch.sign(torch.diagonal(r))[None, :]
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        # (weak ref to an input, its version, a callable returning its rotation or None): see
        # TrellisLinear.rotated_input (a strong holder without autograd, a weak reference under it)
        self.last_rotated: tuple[weakref.ref, int, Callable[[], torch.Tensor | None]] | None = None

    def _parts(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Signs, the Hadamard factor ``H_q`` and the mix in ``like``'s device and dtype (``H_p = H_a (x) H_q``
        with ``a = p / q``; ``H_a`` is ``H_q``'s leading block, as Sylvester's matrices nest)."""
        key = (like.device, like.dtype)
        if key not in self._cache:
            self._cache[key] = (
                self._signs.to(like.device, like.dtype),
                _hadamard(self._q, like.device, like.dtype),
                self._mix.to(like.device, like.dtype),
            )
        return self._cache[key]

    @property
    def _q(self) -> int:
        """The larger Kronecker factor of ``p``: ``2**ceil(log2(p) / 2)``."""
        return 2 ** (self.p.bit_length() // 2)  # p = 2**k: bit_length k + 1, so 2**ceil(k / 2)

    def _hadamard_groups(self, z: torch.Tensor, had_q: torch.Tensor) -> torch.Tensor:
        """``z @ H_p`` on the last axis (``[..., p]``) as ``H_a Z H_q`` on its ``[a, q]`` view: Sylvester's
        ``H_p = H_a (x) H_q`` (row-major index ``i = i_a q + i_q``), so a decode step reads two small factors
        (at most 64 x 64 for ``p = 4096``) instead of a dense ``p x p`` matrix (64 MB in fp32)."""
        q = self._q
        a = self.p // q
        z = z.reshape(*z.shape[:-1], a, q) @ had_q
        if a > 1:
            h_a = had_q[:a, :a] * math.sqrt(q / a)  # H_q's leading a x a block is sqrt(a/q) H_a
            z = h_a @ z
        return z.reshape(*z.shape[:-2], self.p)

    def matrix(self, like: torch.Tensor) -> torch.Tensor:
        """``R`` itself (``[n, n]`` in ``like``'s device and dtype, built in float64 once per device and dtype), for
        :meth:`rotate`'s ``dense`` form."""
        key = ("dense", like.device, like.dtype)
        if key not in self._cache:
            self._cache[key] = self.rotate(torch.eye(self.n, dtype=torch.float64)).to(like.device, like.dtype)
        return self._cache[key]

    def rotate(self, x: torch.Tensor, dense: bool = False) -> torch.Tensor:
        """``x R``. ``dense``: one matmul with the ``[n, n]`` matrix (:meth:`matrix`) instead of the factored
        signs / Hadamard groups / mix: more arithmetic (n per element instead of about p^(1/2) + m), but one GEMM
        forward and one backward instead of a chain of small batched ones, which is what training at thousands of
        tokens per call pays for on a GPU (see ``DENSE_TRAINING_ROTATION_MAX``)."""
        if dense:
            return x @ self.matrix(x)
        signs, had_q, mix = self._parts(x)
        y = self._hadamard_groups((x * signs).reshape(*x.shape[:-1], self.m, self.p), had_q)
        if self.m > 1:
            y = torch.einsum("ji,...jp->...ip", mix, y)
        return y.reshape(x.shape)

    def unrotate(self, y: torch.Tensor) -> torch.Tensor:
        signs, had_q, mix = self._parts(y)
        z = y.reshape(*y.shape[:-1], self.m, self.p)
        if self.m > 1:
            z = torch.einsum("ij,...jp->...ip", mix, z)
        return self._hadamard_groups(z, had_q).reshape(y.shape) * signs

    def rotate_hessian(self, h: torch.Tensor) -> torch.Tensor:
        """``R^T H R`` of a symmetric ``H``: the second moment of the rotated inputs."""
        return self.rotate(self.rotate(h).T.contiguous())


_ROTATIONS: dict[tuple[int, int], InputRotation] = {}
_SHARE_INFERENCE_ROTATIONS = False
# Training (autograd) rotations, two knobs that bench/trellis_step_bench.py times against each other:
# - widths up to this rotate by one dense float32 matmul (InputRotation.rotate(dense=True)); wider ones by the
#   factored form, whose arithmetic grows as n (p^(1/2) + m) instead of n^2 (LLaMA's 4096 and 11008: dense would
#   be 4096 and 11008 multiply-adds per element). 0: always factored.
DENSE_TRAINING_ROTATION_MAX = 1024
# - layers that read one tensor (q/k/v, gate/up) share its rotation under autograd too (one rotation forward and
#   one backward instead of three or two; the gradients of the consumers are summed before it, as for any tensor
#   read twice). False: every layer rotates its own copy.
SHARE_TRAINING_ROTATIONS = True


@contextlib.contextmanager
def shared_rotations() -> Iterator[None]:
    """Let trellis layers reuse the rotation of an inference-mode input by its identity alone (such tensors carry no
    version counter). For a model's forward passes, where q/k/v and gate/up read one fresh tensor each and nothing
    changes it in place in between (``lit_cb generate`` decodes inside it); not for code that mutates a layer's
    input in place and calls the layer again."""
    global _SHARE_INFERENCE_ROTATIONS
    previous, _SHARE_INFERENCE_ROTATIONS = _SHARE_INFERENCE_ROTATIONS, True
    try:
        yield
    finally:
        _SHARE_INFERENCE_ROTATIONS = previous
        for rot in _ROTATIONS.values():
            rot.last_rotated = None


class _Held:
    """A strong reference with a weak reference's call: ``_Held(t)() is t``."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def __call__(self) -> torch.Tensor:
        return self.tensor


def input_rotation(n: int, seed: int) -> InputRotation:
    """The shared :class:`InputRotation` of ``(n, seed)`` (layers of one width share one)."""
    if (n, seed) not in _ROTATIONS:
        _ROTATIONS[(n, seed)] = InputRotation(n, seed)
    return _ROTATIONS[(n, seed)]


@dataclass(frozen=True)
class TrellisFormat:
    """Shape parameters of a :class:`TrellisLinear`; serialised next to checkpoints."""

    in_features: int
    out_features: int
    state_bits: int = 12
    bits_per_step: int = 2
    tile_rows: int = 32
    tile_cols: int = 8
    rotation_seed: int = 0
    bias: bool = False

    def __post_init__(self) -> None:
        check_walk_bits(self.state_bits, self.bits_per_step)
        for name, size, dim in (("tile_rows", self.tile_rows, "out"), ("tile_cols", self.tile_cols, "in")):
            total = getattr(self, f"{dim}_features")
            if size < 1 or total % size:
                raise ValueError(f"{name}={size} must be >= 1 and divide {dim}_features={total}")

    @property
    def steps(self) -> int:
        """Weights per tile: the length of one walk."""
        return self.tile_rows * self.tile_cols

    @property
    def num_tiles(self) -> int:
        return (self.out_features // self.tile_rows) * (self.in_features // self.tile_cols)

    @property
    def symbols_per_tile(self) -> int:
        return self.state_bits // self.bits_per_step - 1 + self.steps

    def storage_bits(self) -> dict[str, int]:
        """Bits of the symbols (k each, the first state's L included) and the fp16 row scales; no table."""
        return {
            "codes": self.num_tiles * self.symbols_per_tile * self.bits_per_step,
            "scales": self.out_features * 16,
        }

    def bits_per_weight(self) -> float:
        return sum(self.storage_bits().values()) / (self.in_features * self.out_features)

    def to_dict(self) -> dict:
        return asdict(self)


def tiles_to_matrix(tiles: torch.Tensor, fmt: TrellisFormat) -> torch.Tensor:
    """``[num_tiles, steps]`` -> ``[out, in]``: tile ``b * R + r`` (column block ``b``, row tile ``r`` of ``R``)
    covers rows ``r*tile_rows ...`` and columns ``b*tile_cols ...``, walked row by row."""
    row_tiles, col_blocks = fmt.out_features // fmt.tile_rows, fmt.in_features // fmt.tile_cols
    t = tiles.reshape(col_blocks, row_tiles, fmt.tile_rows, fmt.tile_cols)
    return t.permute(1, 2, 0, 3).reshape(fmt.out_features, fmt.in_features)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of ``x`` runs in: autocast's where it is on for ``x``'s device, else ``x``'s."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


class _DeviceDecodedLinear(torch.autograd.Function):
    """``F.linear(xr, unit * scales)`` with ``unit`` (the decoded weight before its row scales) decoded on the
    device in the forward and again in the backward, in the dtype the matmul runs in: only the input and the
    scales are saved, so training a trellis model holds no weight-sized tensor between calls. Gradients: the
    input's ``g @ (unit * scales)``; a row scale's ``sum_t g[t, o] * (xr @ unit^T)[t, o]``."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, xr: torch.Tensor, scales: torch.Tensor, layer: TrellisLinear) -> torch.Tensor:
        dtype = _compute_dtype(xr)
        ctx.save_for_backward(xr, scales)
        ctx.layer = layer
        return F.linear(xr.to(dtype), layer.device_unit_weight(dtype) * scales.to(dtype))

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out: torch.Tensor):
        xr, scales = ctx.saved_tensors
        dtype = grad_out.dtype
        unit = ctx.layer.device_unit_weight(dtype)
        grad_x = grad_s = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_out @ (unit * scales.to(dtype))).to(xr.dtype)
        if ctx.needs_input_grad[1]:
            y_unit = F.linear(xr.to(dtype), unit).float()
            per_row = (grad_out.float() * y_unit).reshape(-1, y_unit.shape[-1]).sum(0)
            grad_s = per_row.reshape(scales.shape).to(scales.dtype)
        return grad_x, grad_s, None


class TrellisLinear(CompressedLinear):
    """A linear layer in the computed-codes trellis format (module docstring). Codes (the symbols) are a
    frozen buffer; the row scales are a parameter that block fine-tuning and recovery may train. The
    values are computed from the state, so there is no codebook to train. Forward: rotate the input (shared with
    layers that read the same tensor), then on a GPU the decode kernels (:mod:`lit_cb.kernels.trellis`: up to 16
    tokens decoded per call, more through a per-call dense decode), elsewhere or in training the dense reference
    (one matmul with the decoded rotated weight, kept while the codes are unchanged)."""

    quant_parameter_names = ("scales",)

    def __init__(self, fmt: TrellisFormat, dtype: torch.dtype = torch.float16, device=None) -> None:
        super().__init__()
        self.fmt = fmt
        self.in_features = fmt.in_features
        self.out_features = fmt.out_features
        self.register_buffer(
            "codes", torch.zeros(fmt.num_tiles, fmt.symbols_per_tile, dtype=torch.uint8, device=device)
        )
        self.scales = nn.Parameter(torch.ones(fmt.out_features, 1, dtype=dtype, device=device), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.zeros(fmt.out_features, dtype=dtype, device=device), requires_grad=False)
            if fmt.bias
            else None
        )

    @property
    def bits(self) -> int:
        """Bits per stored symbol (the codes are bit-packed at this width on disk)."""
        return self.fmt.bits_per_step

    def _slot_like(self) -> torch.Tensor:
        return self.scales

    def rotation(self) -> InputRotation:
        return input_rotation(self.fmt.in_features, self.fmt.rotation_seed)

    def unit_weight(self) -> torch.Tensor:
        """``v(state)`` of every weight (``[out, in]`` float32, rotated basis, before the row scales), decoded
        from the codes once and kept until they change (keyed on their version and device, as
        :func:`lit_cb.layers._code_segments`): the dense reference path would otherwise decode every
        symbol window on every forward of a recovery run, whose codes never change."""

        def decode() -> torch.Tensor:
            f = self.fmt
            values = computed_values(f.state_bits, self.codes.device)
            states = symbols_to_states(self.codes, f.state_bits, f.bits_per_step)
            return tiles_to_matrix(values[states], f).contiguous()

        return self._from_codes("_unit_cache", decode)

    def _from_codes(self, slot: str, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``build()``, kept in ``slot`` (outside the state dict) until the codes change: keyed on their
        version counter (an in-place update), device and storage (a move or a load)."""
        key = (self.codes._version, self.codes.device, self.codes.data_ptr())
        cached = self.__dict__.get(slot)
        if cached is None or cached[0] != key:
            cached = (key, build())
            self.__dict__[slot] = cached
        return cached[1]

    def dequantize_rotated(self) -> torch.Tensor:
        """``W_r`` (``[out, in]``, the scales' dtype): every weight's ``scale_row * v(state)`` in the rotated basis
        (differentiable in the scales)."""
        return self.unit_weight().to(self.scales.dtype) * self.scales

    def dequantize_format(self) -> torch.Tensor:
        w = self.dequantize_rotated()
        return self.rotation().unrotate(w.float()).to(w.dtype)

    def tile_words(self) -> torch.Tensor:
        """The codes as the decode kernel reads them (:func:`lit_cb.kernels.trellis.pack_tile_words`: 2.1 bits a
        weight at k = 2), packed once and kept until the codes change."""
        from lit_cb.kernels.trellis import pack_tile_words

        return self._from_codes("_words_cache", lambda: pack_tile_words(self.codes, self.fmt))

    def _kernel_forward(self, xr: torch.Tensor) -> torch.Tensor | None:
        """``xr @ W_r^T`` through the kernels on a GPU (or the interpreter in tests), None where none applies (no
        triton, CPU, a format they lack): the reference path then decodes once and keeps a float32 copy.
        - Autograd (training: the scales or the input need a gradient): :class:`_DeviceDecodedLinear`, which
          decodes the weight on the device in the forward and again in the backward, so no copy of the weight's
          size outlives a call (the float32 copies would take 26 GB for a 7B model).
        - Up to 16 tokens: the decode kernels. More: the weight decoded on the device for this call, then one
          dense matmul."""
        if not self.use_kernels:
            return None
        try:
            from lit_cb.kernels import dispatch
            from lit_cb.kernels import trellis as kernels
        except ImportError:  # no triton: the reference path
            return None
        if not dispatch._device_ok(xr) or not kernels.supports(self.fmt):
            return None
        if torch.is_grad_enabled() and (xr.requires_grad or self.scales.requires_grad):
            return _DeviceDecodedLinear.apply(xr, self.scales, self)
        tokens = xr.numel() // self.in_features
        if tokens > kernels.MAX_TOKENS:
            return F.linear(xr, kernels.trellis_dequantize(self.tile_words(), self.scales, self.fmt, xr.dtype))
        flat = xr.reshape(tokens, self.in_features)
        out = kernels.trellis_gemv(flat, self.tile_words(), self.scales, self.fmt)
        return out.to(xr.dtype).reshape(*xr.shape[:-1], self.out_features)

    def device_unit_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """``v(state)`` of every weight (``[out, in]`` in ``dtype``, a transposed view) decoded on the device for one
        use (:func:`lit_cb.kernels.trellis.trellis_dequantize` with unit scales); nothing is kept."""
        from lit_cb.kernels import trellis as kernels

        ones = torch.ones(self.out_features, device=self.codes.device, dtype=torch.float32)
        return kernels.trellis_dequantize(self.tile_words(), ones, self.fmt, dtype)

    def rotated_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x R`` in ``x``'s dtype. Without autograd the last result is kept on the shared rotation (keyed on the
        input object and its version; inference-mode tensors carry no version, so they are kept only inside
        :func:`shared_rotations`), so layers that read the same input, as q/k/v and gate/up do, rotate it once:
        a decode step makes 4 rotations per block instead of 7; on a GPU the rotation is the Triton kernels'."""
        rot = self.rotation()
        if torch.is_grad_enabled():
            return self._training_rotation(x, rot)
        inference = x.is_inference()  # no version counter: an in-place change would be invisible
        keep = not inference or _SHARE_INFERENCE_ROTATIONS
        version = -1 if inference else x._version
        last = rot.last_rotated
        if keep and last is not None and last[0]() is x and last[1] == version:
            cached = last[2]()
            if cached is not None and not cached.requires_grad:
                return cached
        xr = None
        if self.use_kernels:
            try:
                from lit_cb.kernels import rotation as kernels
            except ImportError:  # no triton: PyTorch below
                kernels = None
            if kernels is not None and kernels.supports(rot, x):
                xr = kernels.rotate(x, rot)  # one or two launches (lit_cb/kernels/rotation.py)
        if xr is None:
            xr = rot.rotate(x.float()).to(x.dtype)
        if keep:
            rot.last_rotated = (weakref.ref(x), version, _Held(xr))
        return xr

    @staticmethod
    def _training_rotation(x: torch.Tensor, rot: InputRotation) -> torch.Tensor:
        """``x R`` under autograd, in float32 (then ``x``'s dtype): shared by the layers that read ``x`` (keyed on its
        identity and version, as without autograd) when ``SHARE_TRAINING_ROTATIONS``, and one dense matmul up to
        ``DENSE_TRAINING_ROTATION_MAX`` inputs."""
        last = rot.last_rotated
        share = SHARE_TRAINING_ROTATIONS and not x.is_inference()  # inference tensors have no version counter
        if share and last is not None and last[0]() is x and last[1] == x._version:
            cached = last[2]()
            if cached is not None and cached.requires_grad == x.requires_grad:
                return cached
        xr = rot.rotate(x.float(), dense=rot.n <= DENSE_TRAINING_ROTATION_MAX).to(x.dtype)
        # A weak reference to the result too: a strong one would keep this step's autograd graph (and the
        # parameters' gradient accumulators made on this stream) alive into the next step, which breaks CUDA
        # graph capture (recovery.cuda_graphs: the engine syncs with the old accumulators' stream). While the
        # layers that share it run, the graph holds it (saved for their backward).
        rot.last_rotated = (weakref.ref(x), x._version, weakref.ref(xr)) if share else None
        return xr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xr = self.rotated_input(x)
        out = self._kernel_forward(xr)
        if out is None:
            out = F.linear(xr, self.dequantize_rotated().to(x.dtype))
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return self.add_low_rank_output(x, out)

    @classmethod
    def from_walks(
        cls,
        fmt: TrellisFormat,
        states: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float16,
    ) -> TrellisLinear:
        """A layer from ``[num_tiles, steps]`` int64 walks (tile order of :func:`tiles_to_matrix`) and row scales."""
        if tuple(states.shape) != (fmt.num_tiles, fmt.steps):
            raise ValueError(f"walks have shape {tuple(states.shape)}, expected {(fmt.num_tiles, fmt.steps)}")
        layer = cls(fmt, dtype=dtype, device=states.device)
        layer.codes.copy_(walk_to_symbols(states, fmt.state_bits, fmt.bits_per_step))
        layer.scales.data.copy_(scales.reshape(fmt.out_features, 1))
        if fmt.bias:
            if bias is None:
                raise ValueError("format has bias=True but no bias tensor was given")
            layer.bias.data.copy_(bias)
        return layer

    def spec(self) -> dict:
        """JSON description from which :meth:`build_from_spec` rebuilds an empty layer (:mod:`lit_cb.serialization`)."""
        return {
            "type": "TrellisLinear",
            "format": self.fmt.to_dict(),
            "dtype": str(self.scales.dtype).removeprefix("torch."),
            "low_rank": self.rank,
            **({"low_rank_bits": self.low_rank_bits} if self.rank and self.low_rank_bits != 16 else {}),
        }

    @classmethod
    def build_from_spec(cls, spec: dict) -> TrellisLinear:
        layer = cls(TrellisFormat(**spec["format"]), dtype=getattr(torch, spec.get("dtype", "float16")))
        if spec.get("low_rank", 0):
            layer.init_low_rank(spec["low_rank"], spec.get("low_rank_bits", 16))
        return layer

    def extra_repr(self) -> str:
        f = self.fmt
        return (
            f"in={f.in_features}, out={f.out_features}, trellis L{f.state_bits} k{f.bits_per_step} "
            f"tile {f.tile_rows}x{f.tile_cols}, rank={self.rank}, bits/weight={self.bits_per_weight():.3f}"
        )


def _register_serialization() -> None:
    # Lets lit_cb.serialization rebuild saved trellis layers once this module has been imported.
    from lit_cb.serialization import register_module_type

    register_module_type("TrellisLinear", TrellisLinear.build_from_spec)


_register_serialization()
