"""Config of the sequential compression driver (the driver lives in :mod:`lit_cb.compress`)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

from lit_cb.architectures import DEFAULT_TARGETS
from lit_cb.configs import methods as registry
from lit_cb.typed_config import build

HessianDtype = Literal["float32", "float64"]
# Names of lit_cb.hessian.HESSIAN_DTYPES (that dict holds torch dtypes; a test keeps the two equal).
HESSIAN_DTYPE_NAMES = get_args(HessianDtype)


@dataclass
class CompressionConfig:
    """What to compress and how. ``method`` names a registered method; ``method_config`` holds
    the fields of that method's config dataclass."""

    method: str = "codebook"
    """Compression method (a registered name; its settings go in method_config)."""
    method_config: dict[str, Any] = field(default_factory=dict)
    """Fields of the method's config dataclass (listed below per method)."""
    targets: str = DEFAULT_TARGETS
    """Regular expression selecting the linears to compress (searched in module names)."""
    keep_dense: int = 0
    """Number of most Hessian-salient target linears left dense (>= 0)."""
    true_sequential: bool = True
    """Re-collect a block's Hessians after each group of linears (q/k/v, o, gate/up, down)."""
    hessian_dtype: HessianDtype = "float32"
    """dtype the Hessians XᵀX are accumulated in."""
    forward_batch_size: int = 8
    """Calibration windows per block forward (>= 1)."""
    offload_activations: bool = False
    """Keep the block inputs/outputs on the CPU between blocks (saves GPU memory)."""
    block_finetune: dict[str, Any] | None = None
    """Block fine-tuning after each block (null: off); fields listed below."""

    def __post_init__(self) -> None:
        registry.config_class(self.method)  # raises with the list of known methods
        if self.keep_dense < 0:
            raise ValueError(f"compression.keep_dense={self.keep_dense} must be >= 0")
        if self.hessian_dtype not in HESSIAN_DTYPE_NAMES:
            raise ValueError(
                f"compression.hessian_dtype={self.hessian_dtype!r}; allowed: {sorted(HESSIAN_DTYPE_NAMES)}"
            )
        if self.forward_batch_size < 1:
            raise ValueError(f"compression.forward_batch_size={self.forward_batch_size} must be >= 1")
        try:
            re.compile(self.targets)
        except re.error as err:
            raise ValueError(f"compression.targets={self.targets!r} is not a valid regular expression: {err}") from err
        self.method_settings()  # validate the method's own fields now, not after calibration
        self.finetune_settings()

    def method_settings(self):
        cls = registry.config_class(self.method)
        return build(cls, self.method_config, "compression.method_config")

    def finetune_settings(self):
        if self.block_finetune is None:
            return None
        from lit_cb.configs.block_finetune import BlockFinetuneConfig

        return build(BlockFinetuneConfig, self.block_finetune, "compression.block_finetune")

    def to_dict(self) -> dict:
        return asdict(self)
