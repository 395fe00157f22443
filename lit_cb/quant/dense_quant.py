"""Scalar group-wise integer quantization shared by the RTN and GPTQ baselines.

The baselines exist so that users can compare the codebook methods with what they would use
instead, so the grid is the conventional one of GPTQ/AutoGPTQ rather than something tuned here:

* asymmetric (default): per group, ``xmin = min(w.min(), 0)``, ``xmax = max(w.max(), 0)``
  (the range always contains 0, so an exact zero weight stays exact),
  ``scale = (xmax - xmin) / (2**bits - 1)``, ``zero = round(-xmin / scale)`` (an integer in
  ``[0, 2**bits - 1]``);
* symmetric: ``scale = 2 * max|w| / (2**bits - 1)``, ``zero = 2**(bits - 1)``;
* ``code = clamp(round(w / scale) + zero, 0, 2**bits - 1)``, ``w_hat = scale * (code - zero)``.

Scales and zeros are stored in float16, so they are rounded to float16 *before* the codes are
chosen: the codes are then optimal for the grid that is actually stored, and GPTQ's error
feedback sees exactly the weights that :meth:`GroupQuantLinear.dequantize` will produce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lit_cb.configs.dense import ALLOWED_BITS, validate_bits_group  # noqa: F401 (re-exported)

# Smallest scale we store; keeps all-zero groups (scale 0) from dividing by zero. A power of two,
# exact in float16 (subnormal), and far below any real weight spacing.
MIN_SCALE = 2.0**-20
MAX_SCALE = float(torch.finfo(torch.float16).max)


def resolve_group_size(group_size: int, in_features: int) -> int:
    """The effective group size for a layer (``-1`` -> the whole row); checks divisibility."""
    if group_size == -1:
        return in_features
    if in_features % group_size:
        raise ValueError(f"group_size={group_size} does not divide in_features={in_features}")
    return group_size


def group_params(w: torch.Tensor, bits: int, symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max ``(scale, zero)`` for each row of ``w`` ``[rows, n]``, as ``[rows]`` tensors in
    ``w``'s dtype whose values are exactly representable in float16."""
    maxq = 2**bits - 1
    xmin = w.amin(dim=1).clamp(max=0)
    xmax = w.amax(dim=1).clamp(min=0)
    if symmetric:
        amax = torch.maximum(-xmin, xmax)
        scale = 2 * amax / maxq
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        scale = (xmax - xmin) / maxq
    scale = scale.clamp(MIN_SCALE, MAX_SCALE).to(torch.float16).to(w.dtype)
    if not symmetric:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def quantize_to_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer-valued codes (in ``w``'s float dtype) of ``w`` on the grid ``scale * (code - zero)``;
    ``scale``/``zero`` broadcast against ``w``."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``scale * (codes - zero)``; the single definition of the grid used everywhere."""
    return scale * (codes - zero)


@torch.no_grad()
def rtn_quantize_weight(
    weight: torch.Tensor, bits: int, group_size: int, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest of ``weight`` ``[out, in]`` with contiguous groups of ``group_size`` columns.

    Returns ``codes`` (int64 ``[out, in]``), ``scales`` and ``zeros`` (``weight``'s dtype,
    ``[out, in // group_size]``).
    """
    out_features, in_features = weight.shape
    gs = resolve_group_size(group_size, in_features)
    groups = weight.reshape(out_features * (in_features // gs), gs)
    scale, zero = group_params(groups, bits, symmetric)
    codes = quantize_to_codes(groups, scale[:, None], zero[:, None], bits)
    n_groups = in_features // gs
    return (
        codes.reshape(out_features, in_features).to(torch.int64),
        scale.reshape(out_features, n_groups),
        zero.reshape(out_features, n_groups),
    )


class GroupQuantLinear(nn.Module):
    """A linear layer stored as ``bits``-bit integer codes with per-group float16 scales and zeros.

    * ``codes``  ``[out, in]`` uint8 (one code per byte in memory; saved bit-packed at ``bits`` per
      code for 2-4 bits, :mod:`lit_cb.bitpack`, so files hold what :meth:`storage_bits` counts)
    * ``scales``, ``zeros``  ``[out, n_groups]`` float16
    * ``g_idx``  ``[in]`` int32 or None: the group of each input column. None means contiguous
      groups of ``group_size`` columns; GPTQ with act-order (non-static groups) forms its groups in
      the permuted column order and needs the explicit map.

    The forward pass is the PyTorch reference: dequantize, then ``F.linear``. It exists to measure
    what RTN/GPTQ cost in accuracy at a given bits/weight, not to be fast.
    """

    def __init__(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        bits: int,
        group_size: int,
        bias: torch.Tensor | None = None,
        g_idx: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if bits not in ALLOWED_BITS:
            raise ValueError(f"bits={bits} is not supported; use one of {ALLOWED_BITS}")
        out_features, in_features = codes.shape
        gs = resolve_group_size(group_size, in_features)
        n_groups = in_features // gs
        if tuple(scales.shape) != (out_features, n_groups) or tuple(zeros.shape) != (out_features, n_groups):
            raise ValueError(
                f"scales/zeros have shapes {tuple(scales.shape)}/{tuple(zeros.shape)}, "
                f"expected {(out_features, n_groups)}"
            )
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
            raise ValueError(f"codes must lie in [0, {2**bits}) for bits={bits}")
        if g_idx is not None:
            if tuple(g_idx.shape) != (in_features,):
                raise ValueError(f"g_idx has shape {tuple(g_idx.shape)}, expected ({in_features},)")
            if int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups:
                raise ValueError(f"g_idx entries must lie in [0, {n_groups})")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.register_buffer("codes", codes.to(torch.uint8).contiguous())
        self.register_buffer("scales", scales.to(torch.float16).contiguous())
        self.register_buffer("zeros", zeros.to(torch.float16).contiguous())
        self.register_buffer("g_idx", None if g_idx is None else g_idx.to(torch.int32).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @property
    def num_groups(self) -> int:
        return self.scales.shape[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense ``[out, in]`` weight. Computed in float32 (the arithmetic the quantizers assumed),
        then cast to ``dtype``."""
        codes = self.codes.to(torch.float32)
        scales = self.scales.to(torch.float32)
        zeros = self.zeros.to(torch.float32)
        if self.g_idx is not None:
            idx = self.g_idx.long()
            w = dequantize_codes(codes, scales[:, idx], zeros[:, idx])
        else:
            gs = self.in_features // self.num_groups
            w = dequantize_codes(
                codes.reshape(self.out_features, self.num_groups, gs), scales[..., None], zeros[..., None]
            ).reshape(self.out_features, self.in_features)
        return w.to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (materialised), for evaluation, LoRA merging and tests."""
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantize(x.dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    def storage_bits(self) -> dict[str, int]:
        """Bits of what the (packed) saved file holds: codes at ``bits`` each, scales and zeros at 16
        each (stored float16 although zeros are integers), g_idx at 32 per column when present.
        The bias is not counted, as for :class:`lit_cb.layers.CodebookLinear`."""
        n = self.out_features * self.in_features
        parts = {
            "codes": n * self.bits,
            "scales": self.scales.numel() * 16,
            "zeros": self.zeros.numel() * 16,
        }
        if self.g_idx is not None:
            parts["g_idx"] = self.g_idx.numel() * 32
        return parts

    def bits_per_weight(self) -> float:
        return sum(self.storage_bits().values()) / (self.out_features * self.in_features)

    def spec(self) -> dict:
        """JSON description from which :func:`build_from_spec` rebuilds an empty layer of this shape
        (the hook :mod:`lit_cb.serialization` uses; tensors then come from the state dict)."""
        return {
            "type": "GroupQuantLinear",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bits": self.bits,
            "group_size": self.group_size,
            "g_idx": self.g_idx is not None,
            "bias_dtype": None if self.bias is None else str(self.bias.dtype).removeprefix("torch."),
        }

    @classmethod
    def build_from_spec(cls, spec: dict) -> GroupQuantLinear:
        in_f, out_f = spec["in_features"], spec["out_features"]
        n_groups = in_f // resolve_group_size(spec["group_size"], in_f)
        bias_dtype = spec.get("bias_dtype")
        with torch.device("cpu"):  # the constructor checks values, which it cannot on the meta device
            return cls(
                torch.zeros(out_f, in_f, dtype=torch.uint8),
                torch.ones(out_f, n_groups),
                torch.zeros(out_f, n_groups),
                spec["bits"],
                spec["group_size"],
                bias=None if bias_dtype is None else torch.zeros(out_f, dtype=getattr(torch, bias_dtype)),
                g_idx=torch.zeros(in_f, dtype=torch.int32) if spec.get("g_idx") else None,
            )

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}, "
            f"act_order_g_idx={self.g_idx is not None}, bits/weight={self.bits_per_weight():.3f}"
        )


def _register_serialization() -> None:
    # Lets lit_cb.serialization rebuild saved RTN/GPTQ layers once this module has been imported.
    try:
        from lit_cb.serialization import register_module_type
    except ImportError:  # serialization's optional dependencies (safetensors) missing
        return
    register_module_type("GroupQuantLinear", GroupQuantLinear.build_from_spec)


_register_serialization()
