"""Round-to-nearest (RTN) group-wise quantization: the baseline every other method must beat.

RTN ignores the calibration Hessian; it is what one gets "for free" at a given bit width, so the
report shows how much of the gap to fp16 GPTQ and the codebook methods close.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lit_cb.quant.dense_quant import GroupQuantLinear, rtn_quantize_weight, validate_bits_group
from lit_cb.quant.registry import register_method


@dataclass(frozen=True)
class RTNConfig:
    """Round-to-nearest with min-max scale/zero per group of ``group_size`` input columns.

    ``bits`` in (2, 3, 4, 8); ``group_size`` -1 (whole row) or a positive divisor of in_features;
    ``symmetric`` uses a zero point fixed at ``2**(bits-1)`` (still stored, still counted).
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False

    def __post_init__(self) -> None:
        validate_bits_group(self.bits, self.group_size)
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric={self.symmetric!r} must be a bool")


@register_method(RTNConfig, "rtn")
def quantize_rtn(
    weight: torch.Tensor, hessian: torch.Tensor | None, config: RTNConfig, bias: torch.Tensor | None = None
) -> GroupQuantLinear:
    """Quantize ``weight`` ``[out, in]`` by rounding to nearest; ``hessian`` is accepted for the
    registry's uniform signature and ignored."""
    del hessian
    codes, scales, zeros = rtn_quantize_weight(weight.float(), config.bits, config.group_size, config.symmetric)
    return GroupQuantLinear(codes, scales, zeros, config.bits, config.group_size, bias=bias)
