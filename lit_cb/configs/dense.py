"""Configs of the scalar baselines RTN and GPTQ (transforms: :mod:`lit_cb.quant.rtn`,
:mod:`lit_cb.quant.gptq`)."""

from __future__ import annotations

from dataclasses import dataclass

ALLOWED_BITS = (2, 3, 4, 8)


def validate_bits_group(bits: int, group_size: int) -> None:
    """Shared ``__post_init__`` checks of the RTN and GPTQ configs (ValueError names the field)."""
    if isinstance(bits, bool) or bits not in ALLOWED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; use one of {ALLOWED_BITS}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size != -1 and group_size < 1):
        raise ValueError(
            f"group_size={group_size!r} is not allowed; use -1 (one group per row) or a positive int "
            "that divides in_features (e.g. 32, 64, 128)"
        )


@dataclass(frozen=True)
class RTNConfig:
    """Round-to-nearest with min-max scale/zero per group of ``group_size`` input columns.

    ``bits`` in (2, 3, 4, 8); ``group_size`` -1 (whole row) or a positive divisor of in_features;
    ``symmetric`` uses a zero point fixed at ``2**(bits-1)`` (still stored, still counted).
    """

    bits: int = 4
    """Bits per weight code, one of 2, 3, 4, 8."""
    group_size: int = 128
    """Input columns sharing one scale/zero: -1 (whole row) or a positive divisor of in_features."""
    symmetric: bool = False
    """Zero point fixed at 2**(bits-1) instead of fitted."""

    def __post_init__(self) -> None:
        validate_bits_group(self.bits, self.group_size)
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric={self.symmetric!r} must be a bool")


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ settings. ``bits`` in (2, 3, 4, 8); ``group_size`` -1 (whole row) or a positive divisor of
    in_features; ``damp`` relative dampening (> 0 and <= 1 recommended 0.01); ``act_order`` processes
    columns by descending Hessian diagonal; ``block_size`` columns per lazy batch update;
    ``static_groups`` fixes group parameters before the sweep (only matters with act_order)."""

    bits: int = 4
    """Bits per weight code, one of 2, 3, 4, 8."""
    group_size: int = 128
    """Input columns sharing one scale/zero: -1 (whole row) or a positive divisor of in_features."""
    damp: float = 0.01
    """Hessian dampening as a fraction of mean(diag H), in [0, 1]."""
    act_order: bool = False
    """Process columns by descending Hessian diagonal."""
    block_size: int = 128
    """Columns per lazy batch update (>= 1)."""
    static_groups: bool = False
    """Fix group parameters before the sweep (only matters with act_order)."""
    symmetric: bool = False
    """Zero point fixed at 2**(bits-1) instead of fitted."""

    def __post_init__(self) -> None:
        validate_bits_group(self.bits, self.group_size)
        if isinstance(self.damp, bool) or not isinstance(self.damp, int | float) or not 0 <= self.damp <= 1:
            raise ValueError(f"damp={self.damp!r} must be a float in [0, 1] (typically 0.01)")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size={self.block_size!r} must be a positive int (typically 128)")
        for name in ("act_order", "static_groups", "symmetric"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a bool")
