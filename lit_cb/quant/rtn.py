"""Round-to-nearest (RTN) group-wise quantization: the baseline every other method must beat.

RTN ignores the calibration Hessian; it is what one gets "for free" at a given bit width, so the
report shows how much of the gap to fp16 GPTQ and the codebook methods close.
"""

from __future__ import annotations

import torch

from lit_cb.configs.dense import RTNConfig  # noqa: F401 (re-exported: the config lives torch-free)
from lit_cb.quant.dense_quant import GroupQuantLinear, rtn_quantize_weight
from lit_cb.quant.registry import register_method


@register_method(RTNConfig, "rtn")
def quantize_rtn(
    weight: torch.Tensor, hessian: torch.Tensor | None, config: RTNConfig, bias: torch.Tensor | None = None
) -> GroupQuantLinear:
    """Quantize ``weight`` ``[out, in]`` by rounding to nearest; ``hessian`` is accepted for the
    registry's uniform signature and ignored."""
    del hessian
    codes, scales, zeros = rtn_quantize_weight(weight.float(), config.bits, config.group_size, config.symmetric)
    return GroupQuantLinear(codes, scales, zeros, config.bits, config.group_size, bias=bias)
