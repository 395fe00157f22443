"""The compressed linear layer shared by every codebook method (LLM-Codebook: M=1, AQLM: M>=1).

One storage format, so that one kernel family, one save/load path and one LoRA dispatcher serve
all methods:

* ``codes``     ``[num_out_groups, num_in_groups, num_codebooks]``  uint8 (B <= 8) or int16 (B <= 16)
* ``codebooks`` ``[num_codebooks, codebook_size, out_group_size, in_group_size]``  float16
* ``scales``    ``[num_out_groups, 1, 1, 1]``  float16
* ``bias``      ``[out_features]`` or None

Weight row-group ``o``, column-group ``i`` is ``scales[o] * sum_m codebooks[m, codes[o, i, m]]``.
int16 codes above 2**15 are stored wrapped (two's complement) and unwrapped with a bit mask.
That is the in-memory layout the kernels read; saved files hold codes of widths other than 8 and 16
bit-packed at B bits each (:mod:`lit_cb.bitpack`, via :mod:`lit_cb.hf_quantizer`).
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lit_cb.configs.format import ALLOWED_GROUP_SIZES, LOW_RANK_BITS, MAX_NBITS, MIN_NBITS


@dataclass(frozen=True)
class CodebookFormat:
    """Shape parameters of a :class:`CodebookLinear`; serialised next to checkpoints."""

    in_features: int
    out_features: int
    in_group_size: int = 4
    out_group_size: int = 1
    num_codebooks: int = 1
    nbits_per_codebook: int = 8
    bias: bool = False

    def __post_init__(self) -> None:
        if self.in_group_size not in ALLOWED_GROUP_SIZES:
            raise ValueError(f"in_group_size={self.in_group_size} is not allowed; use one of {ALLOWED_GROUP_SIZES}")
        if self.out_group_size not in ALLOWED_GROUP_SIZES:
            raise ValueError(f"out_group_size={self.out_group_size} is not allowed; use one of {ALLOWED_GROUP_SIZES}")
        if not MIN_NBITS <= self.nbits_per_codebook <= MAX_NBITS:
            raise ValueError(f"nbits_per_codebook={self.nbits_per_codebook} is out of range [{MIN_NBITS}, {MAX_NBITS}]")
        if self.num_codebooks < 1:
            raise ValueError(f"num_codebooks={self.num_codebooks} must be >= 1")
        if self.in_features % self.in_group_size:
            raise ValueError(f"in_features={self.in_features} is not divisible by in_group_size={self.in_group_size}")
        if self.out_features % self.out_group_size:
            raise ValueError(
                f"out_features={self.out_features} is not divisible by out_group_size={self.out_group_size}"
            )

    @property
    def codebook_size(self) -> int:
        return 2**self.nbits_per_codebook

    @property
    def num_in_groups(self) -> int:
        return self.in_features // self.in_group_size

    @property
    def num_out_groups(self) -> int:
        return self.out_features // self.out_group_size

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.uint8 if self.nbits_per_codebook <= 8 else torch.int16

    def storage_bits(self) -> dict[str, int]:
        """Bits held by codes, codebooks and scales (fp16), as counted for bits/weight."""
        codes = self.num_out_groups * self.num_in_groups * self.num_codebooks * self.nbits_per_codebook
        codebooks = self.num_codebooks * self.codebook_size * self.out_group_size * self.in_group_size * 16
        scales = self.num_out_groups * 16
        return {"codes": codes, "codebooks": codebooks, "scales": scales}

    def bits_per_weight(self) -> float:
        return sum(self.storage_bits().values()) / (self.in_features * self.out_features)

    def to_dict(self) -> dict:
        return asdict(self)


def dequantize_low_rank(
    qa: torch.Tensor, qb: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 factors of an 8-bit low-rank slot: ``A[k, :] = qa[k, :] * a_scale[k]`` and ``B[:, k] =
    qb[:, k] * b_scale[k]``. The one formula rounding and loading share, so a loaded slot is
    bit-identical to the one evaluated before saving."""
    return qa.float() * a_scale.float()[:, None], qb.float() * b_scale.float()[None, :]


def unpack_codes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """Codes as int64 indices in ``[0, 2**nbits)`` (undoes the int16 wrap of B > 15)."""
    return codes.to(torch.int64) & ((1 << nbits) - 1)


def pack_codes(indices: torch.Tensor, nbits: int) -> torch.Tensor:
    """int64 indices -> the storage dtype of the format (uint8 for B <= 8, wrapped int16 above)."""
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= 2**nbits):
        raise ValueError(f"code indices must lie in [0, {2**nbits}) for nbits={nbits}")
    return _to_storage(indices, nbits)


def _to_storage(indices: torch.Tensor, nbits: int) -> torch.Tensor:
    """:func:`pack_codes` without the range check, for indices in range by construction (the check
    reads the tensor back to the host: two synchronisations per call)."""
    if nbits <= 8:
        return indices.to(torch.uint8)
    wrapped = torch.where(indices >= 2**15, indices - 2**16, indices)
    return wrapped.to(torch.int16)


def dequantize_weight(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, nbits: int) -> torch.Tensor:
    """Dense ``[out_features, in_features]`` weight in the codebooks' dtype (differentiable in
    codebooks and scales)."""
    if torch.is_grad_enabled() and (codebooks.requires_grad or scales.requires_grad):
        return _DequantizeFn.apply(codebooks, scales, codes, nbits)
    return _groups_to_weight(_gather_groups(unpack_codes(codes, nbits), codebooks) * scales)


def _gather_groups(idx: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """``sum_m codebooks[m, idx[..., m]]``: ``[num_out_groups, num_in_groups, out_group_size, in_group_size]``."""
    groups = codebooks[0][idx[..., 0]]
    for m in range(1, idx.shape[-1]):
        groups = groups + codebooks[m][idx[..., m]]
    return groups


def _groups_to_weight(groups: torch.Tensor) -> torch.Tensor:
    num_out_groups, num_in_groups, out_group_size, in_group_size = groups.shape
    return groups.permute(0, 2, 1, 3).reshape(num_out_groups * out_group_size, num_in_groups * in_group_size)


def nearest_codes(
    weight: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor | None, nbits: int, chunk: int | None = None
) -> torch.Tensor:
    """Packed codes of the codeword nearest (in Euclidean distance) to each group of ``weight /
    scale`` (``scales`` None: ``weight`` is in codebook units already, as the latent of
    straight-through code training, ``recovery.ste_codes``).

    One codebook per group only (the sum of several codewords has no closed-form nearest point:
    AQLM's beam search). Computed in float32 outside autocast, in chunks of ``chunk`` groups (by
    default as many as keep the [groups, codewords] distances within 256 MiB: 262k groups for 2^8
    codewords, so SmolLM2's largest linear is one chunk, each chunk being several kernel launches;
    a 7B MLP's 11M groups take 43)."""
    num_codebooks, size, out_group_size, in_group_size = codebooks.shape
    chunk = chunk or max(1, (1 << 26) // size)
    if num_codebooks != 1:
        raise ValueError(f"nearest codes need one codebook per group, got {num_codebooks}")
    out_features, in_features = weight.shape
    nog, nig = out_features // out_group_size, in_features // in_group_size
    with torch.autocast(weight.device.type, enabled=False):
        groups = weight.float().reshape(nog, out_group_size, nig, in_group_size).permute(0, 2, 1, 3)
        if scales is not None:
            scale = scales.float().reshape(nog, 1, 1, 1)
            groups = groups / torch.where(scale == 0, 1.0, scale)  # an all-zero row: any code does
        groups = groups.reshape(nog * nig, -1)
        book = codebooks[0].float().reshape(size, -1)
        norms = (book * book).sum(1)
        idx = torch.empty(groups.shape[0], dtype=torch.long, device=weight.device)
        for start in range(0, groups.shape[0], chunk):
            part = groups[start : start + chunk]
            idx[start : start + chunk] = torch.addmm(norms, part, book.T, alpha=-2.0).argmin(1)
    return _to_storage(idx.reshape(nog, nig, 1), nbits)


_SEGMENT_CACHE: dict[int, tuple] = {}


def _code_segments(codes: torch.Tensor, nbits: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per codebook, the groups sorted by code (int32) and each code's segment end: what the
    codebook gradient needs. Cached per codes tensor until it changes.

    Why: codes stay fixed across thousands of recovery steps, but autograd's backward of
    ``codebooks[m][idx]`` re-sorts every index on every step (a sort-based index_put, ~0.24 ms
    per linear on an H100, about a fifth of a SmolLM2 recovery step). The cache is keyed on the
    tensor's version counter, so an in-place code update (``copy_``, a V-step) invalidates it; it
    lives outside the tensor (a weakly-finalised dict), so deepcopies and pickles do not carry it.
    Cost: 4 bytes per code per codebook while the layer trains (int32 sort order).
    """
    key = (codes._version, nbits, codes.device)
    cached = _SEGMENT_CACHE.get(id(codes))
    if cached is not None and cached[0] == key:
        return cached[1]
    flat = unpack_codes(codes, nbits).reshape(-1, codes.shape[-1])
    order_dtype = torch.int32 if flat.shape[0] < 2**31 else torch.int64
    segments = []
    # Each code's segment end is found in the sorted codes (searchsorted) rather than by bincount,
    # whose output size depends on the data: on CUDA it reads the maximum back to the host, a
    # synchronisation per layer per step where the codes change every step (ste_codes).
    bounds = torch.arange(1, 2**nbits + 1, device=codes.device)
    for m in range(flat.shape[1]):
        ordered, order = torch.sort(flat[:, m], stable=True)
        ends = torch.searchsorted(ordered, bounds)  # number of groups with a code below k + 1
        segments.append((order.to(order_dtype), ends))
    if id(codes) not in _SEGMENT_CACHE:
        weakref.finalize(codes, _SEGMENT_CACHE.pop, id(codes), None)
    _SEGMENT_CACHE[id(codes)] = (key, segments)
    return segments


class _DequantizeFn(torch.autograd.Function):
    """Dequantization with a sort-free codebook gradient.

    The gradient of codeword ``k`` of codebook ``m`` is the sum, over the groups whose code is
    ``k``, of the scaled weight gradient. With the groups pre-sorted by code (:func:`_code_segments`)
    that sum is a difference of two prefix sums, taken in float64 so that cancellation between
    large prefix sums costs no precision (float32 gradients summed over ~10^6 groups)."""

    @staticmethod
    def forward(ctx, codebooks: torch.Tensor, scales: torch.Tensor, codes: torch.Tensor, nbits: int) -> torch.Tensor:
        segments = _code_segments(codes, nbits)
        unscaled = _gather_groups(unpack_codes(codes, nbits), codebooks)
        ctx.save_for_backward(unscaled, scales)
        ctx.segments = segments
        ctx.codebook_shape = codebooks.shape
        return _groups_to_weight(unscaled * scales)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        unscaled, scales = ctx.saved_tensors
        num_out_groups, num_in_groups, out_group_size, in_group_size = unscaled.shape
        g = grad.reshape(num_out_groups, out_group_size, num_in_groups, in_group_size).permute(0, 2, 1, 3)
        grad_codebooks = grad_scales = None
        if ctx.needs_input_grad[1]:
            grad_scales = (g * unscaled).sum(dim=(1, 2, 3), keepdim=True).to(scales.dtype)
        if ctx.needs_input_grad[0]:
            num_codebooks, codebook_size = ctx.codebook_shape[:2]
            scaled = (g * scales).reshape(-1, out_group_size * in_group_size)
            parts = []
            for order, ends in ctx.segments:
                # The scan runs along the last dimension of a [og*g, groups] copy: CUDA's cumsum over
                # dim 0 of a [groups, og*g] tensor takes a path that is orders of magnitude slower
                # (pytorch/pytorch#122170: ~137 ms for [1M, 4] against 0.05 ms for [1M, 1]). SmolLM2 g4
                # has 26.5M groups, so that path costs seconds per backward: the likely cause of the
                # 4.8 s recovery steps measured on the H200 (0.23 s on the H100 before this gradient).
                prefix = scaled.index_select(0, order).to(torch.float64).T.contiguous().cumsum(1)
                prefix = torch.cat([prefix.new_zeros(prefix.shape[0], 1), prefix], dim=1)
                starts = torch.cat([ends.new_zeros(1), ends[:-1]])
                parts.append((prefix[:, ends] - prefix[:, starts]).T)
            grad_codebooks = torch.stack(parts).reshape(ctx.codebook_shape).to(grad.dtype)
            assert grad_codebooks.shape[:2] == (num_codebooks, codebook_size)
        return grad_codebooks, grad_scales, None, None


class CompressedLinear(nn.Module):
    """What every compressed linear shares, whatever its weight format: a low-rank correction slot
    (where merged LoRA adapters land: ``W = W_format + B @ A``), its bit count, and the names of the
    format's trainable float tensors. Recovery, block fine-tuning, the LoRA dispatcher and the
    serializer talk to this interface, so a new format (:class:`CodebookLinear`,
    :class:`lit_cb.trellis.TrellisLinear`) plugs in without touching them.

    A subclass sets ``fmt`` (with ``bits_per_weight()``), ``in_features``/``out_features``, and implements
    :meth:`_slot_like` (a float tensor giving the slot's device and dtype), :meth:`dequantize_format`
    and :attr:`quant_parameter_names`."""

    quant_parameter_names: tuple[str, ...] = ()  # the format's float parameters that training may move

    def __init__(self) -> None:
        super().__init__()
        self.low_rank_a: nn.Parameter | None = None  # [rank, in_features]
        self.low_rank_b: nn.Parameter | None = None  # [out_features, rank]
        self.low_rank_bits = 16  # 8: the slot holds int8 values times the scales below (round_low_rank)
        self.low_rank_a_scale: torch.Tensor | None = None  # [rank] fp16 (8-bit slots only)
        self.low_rank_b_scale: torch.Tensor | None = None  # [rank] fp16
        self.use_kernels = True

    def _slot_like(self) -> torch.Tensor:
        raise NotImplementedError

    def dequantize_format(self) -> torch.Tensor:
        """The dense weight the format alone stores (no low-rank slot)."""
        raise NotImplementedError

    @property
    def rank(self) -> int:
        return 0 if self.low_rank_a is None else self.low_rank_a.shape[0]

    def init_low_rank(self, rank: int, bits: int = 16) -> None:
        """Give the layer an (empty) low-rank correction W = dequant(codes) + B @ A, the slot that
        merged LoRA adapters land in (the format cannot absorb them); ``bits=8`` with its scales."""
        dev, dtype = self._slot_like().device, self._slot_like().dtype
        self.low_rank_a = nn.Parameter(torch.zeros(rank, self.in_features, device=dev, dtype=dtype), False)
        self.low_rank_b = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=dtype), False)
        self._set_low_rank_bits(
            bits, torch.ones(rank, device=dev, dtype=dtype), torch.ones(rank, device=dev, dtype=dtype)
        )

    def _set_low_rank_bits(self, bits: int, a_scale: torch.Tensor | None, b_scale: torch.Tensor | None) -> None:
        if bits not in LOW_RANK_BITS:
            raise ValueError(f"low-rank slot bits={bits} is not allowed; use one of {LOW_RANK_BITS}")
        self.low_rank_bits = bits
        for name, scale in (("low_rank_a_scale", a_scale), ("low_rank_b_scale", b_scale)):
            self._buffers.pop(name, None)
            self.__dict__.pop(name, None)
            if bits == 8:
                self.register_buffer(name, scale)  # saved and loaded with the module, moved with it
            else:
                self.__dict__[name] = None

    @torch.no_grad()
    def add_low_rank(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Append ``b @ a`` (``a`` [r, in], ``b`` [out, r]) to the low-rank correction (an 8-bit slot
        becomes a 16-bit one: the new part is not rounded; :meth:`round_low_rank` again if wanted)."""
        like = self._slot_like()
        a, b = a.to(like.device, like.dtype), b.to(like.device, like.dtype)
        if self.low_rank_a is not None:
            a = torch.cat([self.low_rank_a.data, a])
            b = torch.cat([self.low_rank_b.data, b], dim=1)
        self.low_rank_a = nn.Parameter(a.contiguous(), requires_grad=False)
        self.low_rank_b = nn.Parameter(b.contiguous(), requires_grad=False)
        self._set_low_rank_bits(16, None, None)

    @torch.no_grad()
    def round_low_rank(self, bits: int = 8) -> None:
        """Store the low-rank slot in ``bits`` (8: symmetric int8 with one fp16 scale per rank component,
        ``A[k, :] = qa[k, :] * sa[k]`` and ``B[:, k] = qb[:, k] * sb[k]``), rounding its values in place so
        that what is evaluated is what is saved. Half the bits of fp16 factors, so twice the rank fits
        the same bits/weight; the rounding moves each factor entry by at most half its scale."""
        if bits == 16 or self.low_rank_a is None or self.low_rank_bits == bits:
            return  # nothing to round, or rounded already (rounding again could move an entry by an ulp)
        if bits != 8:
            raise ValueError(f"low-rank slot bits={bits} is not allowed; use one of {LOW_RANK_BITS}")
        dtype = self.low_rank_a.dtype
        a, b = self.low_rank_a.float(), self.low_rank_b.float()
        a_scale = (a.abs().amax(dim=1) / 127).to(dtype)  # [r]
        b_scale = (b.abs().amax(dim=0) / 127).to(dtype)  # [r]
        a_scale, b_scale = torch.where(a_scale == 0, 1.0, a_scale), torch.where(b_scale == 0, 1.0, b_scale)
        self._set_low_rank_bits(8, a_scale, b_scale)
        a, b = dequantize_low_rank(*self.low_rank_int8(), a_scale, b_scale)
        self.low_rank_a.data, self.low_rank_b.data = a.to(dtype), b.to(dtype)

    def low_rank_int8(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The int8 values of an 8-bit slot (what a saved folder stores), from the slot and its scales."""
        qa = torch.round(self.low_rank_a.float() / self.low_rank_a_scale.float()[:, None]).clamp(-127, 127)
        qb = torch.round(self.low_rank_b.float() / self.low_rank_b_scale.float()[None, :]).clamp(-127, 127)
        return qa.to(torch.int8), qb.to(torch.int8)

    def bits_per_weight(self) -> float:
        """The format's bits (codes, codebooks, scales, ...), plus the low-rank correction if there is one
        (its factors at ``low_rank_bits``, and an 8-bit slot's two fp16 scales per rank component)."""
        low_rank = self.low_rank_bits * self.rank * (self.in_features + self.out_features)
        if self.low_rank_bits == 8:
            low_rank += 2 * 16 * self.rank
        return self.fmt.bits_per_weight() + low_rank / (self.in_features * self.out_features)

    def dequantize(self) -> torch.Tensor:
        """Dense weight: the format's part plus the low-rank correction."""
        w = self.dequantize_format()
        if self.low_rank_a is not None:
            w = w + self.low_rank_b @ self.low_rank_a
        return w

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (materialised; for evaluation and tests)."""
        return self.dequantize()

    def add_low_rank_output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` plus the slot's ``x @ A^T @ B^T`` (``out`` itself when there is no slot)."""
        if self.low_rank_a is None:
            return out
        return out + F.linear(F.linear(x, self.low_rank_a.to(x.dtype)), self.low_rank_b.to(x.dtype))


class CodebookLinear(CompressedLinear):
    """A linear layer whose weight is stored as codes into learned codebooks.

    Codes are frozen buffers; codebooks and scales are parameters (frozen by default, trainable
    for AQLM's block fine-tuning and end-to-end recovery). The forward pass picks a Triton kernel
    for the format and device when one exists (``lit_cb.kernels``) and otherwise the PyTorch
    reference: dequantize, then matmul.
    """

    quant_parameter_names = ("codebooks", "scales")

    def __init__(self, fmt: CodebookFormat, dtype: torch.dtype = torch.float16, device=None) -> None:
        super().__init__()
        self.fmt = fmt
        self.in_features = fmt.in_features
        self.out_features = fmt.out_features
        self.register_buffer(
            "codes",
            torch.zeros(fmt.num_out_groups, fmt.num_in_groups, fmt.num_codebooks, dtype=fmt.code_dtype, device=device),
        )
        self.codebooks = nn.Parameter(
            torch.zeros(
                fmt.num_codebooks, fmt.codebook_size, fmt.out_group_size, fmt.in_group_size, dtype=dtype, device=device
            ),
            requires_grad=False,
        )
        self.scales = nn.Parameter(
            torch.ones(fmt.num_out_groups, 1, 1, 1, dtype=dtype, device=device), requires_grad=False
        )
        self.bias = (
            nn.Parameter(torch.zeros(fmt.out_features, dtype=dtype, device=device), requires_grad=False)
            if fmt.bias
            else None
        )
        self.latent: nn.Parameter | None = None  # [out_features, in_features] float32: ste_codes training only

    @torch.no_grad()
    def start_latent_training(self) -> None:
        """Give the layer a trainable float32 latent: its dequantized weight divided by the row scales,
        i.e. in the codebook's own units, from which every forward re-assigns the codes (straight-
        through code training, ``recovery.ste_codes``). The nearest codeword of a group's own values
        is its current code, so the model is unchanged until the latent moves. In codebook units
        Adam's steps (about ``latent_lr`` per element) mean the same share of the codeword spacing
        in every model, whatever its weights' magnitude. The low-rank correction stays outside."""
        if self.fmt.num_codebooks != 1:
            raise ValueError(f"{self.extra_repr()}: straight-through code training needs one codebook per group")
        w = dequantize_weight(self.codes, self.codebooks, self.scales, self.fmt.nbits_per_codebook)
        scale = self._row_scales()
        self.latent = nn.Parameter((w.float() / torch.where(scale == 0, 1.0, scale)).contiguous(), requires_grad=True)

    def _row_scales(self) -> torch.Tensor:
        """``[out_features, 1]`` float32: each weight row's scale (shared by an output group's rows)."""
        return self.scales.detach().float().reshape(-1, 1).repeat_interleave(self.fmt.out_group_size, dim=0)

    @torch.no_grad()
    def finish_latent_training(self) -> None:
        """Fix the codes at the latent's nearest codewords (what the next forward would use) and drop
        the latent: the layer is a plain CodebookLinear again, in the stored format."""
        if self.latent is not None:
            self.assign_from_latent()
            self.latent = None

    @torch.no_grad()
    def assign_from_latent(self) -> None:
        self.codes.copy_(nearest_codes(self.latent, self.codebooks, None, self.fmt.nbits_per_codebook))

    @classmethod
    def from_tensors(
        cls,
        fmt: CodebookFormat,
        codes: torch.Tensor,
        codebooks: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float16,
    ) -> CodebookLinear:
        """Build a layer from int64 code indices ``[num_out_groups, num_in_groups, M]`` and float tensors."""
        layer = cls(fmt, dtype=dtype, device=codebooks.device)
        expected = (fmt.num_out_groups, fmt.num_in_groups, fmt.num_codebooks)
        if tuple(codes.shape) != expected:
            raise ValueError(f"codes have shape {tuple(codes.shape)}, expected {expected}")
        layer.codes.copy_(pack_codes(codes, fmt.nbits_per_codebook))
        layer.codebooks.data.copy_(codebooks.reshape(layer.codebooks.shape))
        layer.scales.data.copy_(scales.reshape(layer.scales.shape))
        if fmt.bias:
            if bias is None:
                raise ValueError("format has bias=True but no bias tensor was given")
            layer.bias.data.copy_(bias)
        return layer

    def _slot_like(self) -> torch.Tensor:
        return self.codebooks

    def dequantize_format(self) -> torch.Tensor:
        return dequantize_weight(self.codes, self.codebooks, self.scales, self.fmt.nbits_per_codebook)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        if self.latent is not None:
            # Straight-through: the forward uses the codes nearest the latent; the weight's gradient
            # goes to the codebooks and scales (through the dequantization) and, times the row scale,
            # to the latent (its value here is zero: the forward is the dequantized weight's).
            self.assign_from_latent()
            weight = dequantize_weight(self.codes, self.codebooks, self.scales, self.fmt.nbits_per_codebook)
            weight = weight + ((self.latent - self.latent.detach()) * self._row_scales()).to(weight.dtype)
            out = F.linear(x, weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        elif self.use_kernels and x.is_cuda:
            from lit_cb.kernels import dispatch

            kernel = dispatch.select_kernel(self.fmt, x)
            if kernel is not None:
                out = kernel(x, self.codes, self.codebooks, self.scales, self.bias, self.fmt)
        if out is None:
            weight = dequantize_weight(self.codes, self.codebooks, self.scales, self.fmt.nbits_per_codebook)
            out = F.linear(x, weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return self.add_low_rank_output(x, out)

    def extra_repr(self) -> str:
        f = self.fmt
        return (
            f"in={f.in_features}, out={f.out_features}, {f.num_codebooks}x{f.nbits_per_codebook} "
            f"g{f.in_group_size} og{f.out_group_size}, rank={self.rank}, bits/weight={self.bits_per_weight():.3f}"
        )


def code_bits(module: nn.Module) -> int | None:
    """Bits per stored code of a compressed module (a codebook's B, RTN/GPTQ ``bits``, a trellis's bits per
    step); None if it has no codes. The one answer that packing on save and the integrity check share."""
    if not isinstance(getattr(module, "codes", None), torch.Tensor):
        return None
    bits = getattr(getattr(module, "fmt", None), "nbits_per_codebook", None)
    if bits is None:
        bits = getattr(module, "bits", None)
    return bits if isinstance(bits, int) else None


def is_compressed(module: nn.Module) -> bool:
    return isinstance(module, CompressedLinear)
