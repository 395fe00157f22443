"""Config of block-wise fine-tuning (the training lives in :mod:`lit_cb.block_finetune`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from lit_cb.typed_config import build


@dataclass(frozen=True)
class BlockFinetuneConfig:
    """Hyper-parameters of :func:`finetune_block` (defaults follow AQLM's block fine-tuning)."""

    epochs: int = 5
    """Passes over the calibration samples per block (>= 0; 0 keeps the block as quantized)."""
    lr: float = 1e-4
    """Adam learning rate (finite, > 0)."""
    batch_size: int = 4
    """Calibration samples per step (>= 1)."""
    val_fraction: float = 0.1
    """Fraction of the calibration samples held out for early stopping, in [0, 1)."""
    patience: int = 1
    """Stop after this many epochs without a held-out improvement larger than ``relative_tol``."""
    relative_tol: float = 0.0
    """Smallest relative held-out improvement that counts (finite, >= 0)."""
    adam_beta1: float = 0.9
    """Adam beta1, in [0, 1)."""
    adam_beta2: float = 0.95
    """Adam beta2, in [0, 1)."""
    train_norms: bool = True
    """Train the block's norm weights too."""
    train_biases: bool = False
    """Train the compressed linears' biases too."""
    seed: int = 0
    """Seed of the held-out split and batch order (>= 0)."""

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"BlockFinetuneConfig.{name}={getattr(self, name)!r} is not allowed; {allowed}")

        def is_int(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_float(value: object) -> bool:
            return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

        if not is_int(self.epochs) or self.epochs < 0:
            raise bad("epochs", "use an integer >= 0")
        if not is_float(self.lr) or self.lr <= 0:
            raise bad("lr", "use a finite float > 0")
        if not is_int(self.batch_size) or self.batch_size < 1:
            raise bad("batch_size", "use an integer >= 1")
        if not is_float(self.val_fraction) or not 0.0 <= self.val_fraction < 1.0:
            raise bad("val_fraction", "use a float in [0, 1)")
        if not is_int(self.patience) or self.patience < 1:
            raise bad("patience", "use an integer >= 1")
        if not is_float(self.relative_tol) or self.relative_tol < 0:
            raise bad("relative_tol", "use a finite float >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            if not is_float(value) or not 0.0 <= value < 1.0:
                raise bad(name, "use a float in [0, 1)")
        for name in ("train_norms", "train_biases"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "use True or False")
        if not is_int(self.seed) or self.seed < 0:
            raise bad("seed", "use an integer >= 0")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> BlockFinetuneConfig:
        return build(cls, data, "BlockFinetuneConfig")
