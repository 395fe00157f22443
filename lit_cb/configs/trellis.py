"""Config of the computed-codes trellis quantizer (format: :mod:`lit_cb.trellis`; transform:
:mod:`lit_cb.quant.trellis`). Torch-free, like every method config."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MAX_STATE_BITS = 16


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_walk_bits(state_bits: int, bits_per_step: int) -> None:
    """The one check of (L, k) that the config and :class:`lit_cb.trellis.TrellisFormat` share."""
    k, nb = bits_per_step, state_bits
    if not (1 <= k < nb <= MAX_STATE_BITS and nb % k == 0):
        raise ValueError(
            f"bits_per_step={k}, state_bits={nb}: need 1 <= bits_per_step < state_bits <= {MAX_STATE_BITS}, "
            "state_bits a multiple of bits_per_step (e.g. 2 and 12)"
        )


@dataclass(frozen=True)
class TrellisConfig:
    """Settings of the trellis quantizer: ``bits_per_step`` bits per weight through ``2**state_bits`` states.

    Defaults come from ``bench/computed_codes_probe.py`` on SmolLM2-135M's layers at about 2.07 bits: with
    L = 12 the hashed values cost almost nothing against an i.i.d. table (0.0729 against 0.0722 plain
    error), while L = 8 is poor (0.1209); 32 x 8 tiles with block-LDLQ feedback gave a Hessian-weighted
    error 0.77x the codebook method's (``computed_codes_hessian.json``), and weighting columns in the walk
    by the block's error weight a little less again. The cost of a code is ``2**state_bits`` per weight in
    the Viterbi search, so L = 12 compresses about 16x slower than L = 8.
    """

    state_bits: int = 12
    """L: bits of trellis state (2**L states, each with a computed value); a multiple of bits_per_step, <= 16."""
    bits_per_step: int = 2
    """k: bits per weight of the walk (1 <= k < state_bits)."""
    tile_rows: int = 32
    """Rows per tile (one walk per tile); must divide every compressed layer's out_features."""
    tile_cols: int = 8
    """Columns per tile and per LDLQ feedback block; must divide every compressed layer's in_features."""
    rotation_seed: int = 0
    """Seed of the input rotation (signs, Hadamard groups, orthogonal mix): stored in the format, not the weights."""
    damp: float = 0.01
    """Hessian dampening as a fraction of mean(diag H) (finite, >= 0)."""
    column_weights: bool = True
    """Weigh each column's squared error in the walk by the diagonal of its block's LDLQ error weight."""

    def __post_init__(self) -> None:
        for name in ("state_bits", "bits_per_step", "tile_rows", "tile_cols", "rotation_seed"):
            if not _is_int(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)!r} must be an int")
        check_walk_bits(self.state_bits, self.bits_per_step)
        if self.tile_rows < 1 or self.tile_cols < 1:
            raise ValueError(f"tile_rows={self.tile_rows}, tile_cols={self.tile_cols} must be >= 1 (e.g. 32 and 8)")
        if self.tile_rows * self.tile_cols < 2:
            raise ValueError("a tile must hold at least 2 weights (tile_rows * tile_cols >= 2)")
        if isinstance(self.damp, bool) or not isinstance(self.damp, int | float) or not math.isfinite(self.damp):
            raise ValueError(f"damp={self.damp!r} must be a finite float >= 0 (typically 0.01)")
        if self.damp < 0:
            raise ValueError(f"damp={self.damp!r} must be >= 0 (typically 0.01)")
        if not isinstance(self.column_weights, bool):
            raise ValueError(f"column_weights={self.column_weights!r} must be a bool")

    def layer_format(self, out_features: int, in_features: int, bias: bool = False):
        """The :class:`lit_cb.trellis.TrellisFormat` this config produces for an ``[out, in]`` weight (its exact bits:
        ``storage_bits``; imports torch). Raises ``ValueError`` when the tiles do not divide the layer."""
        from lit_cb.trellis import TrellisFormat

        return TrellisFormat(
            in_features,
            out_features,
            self.state_bits,
            self.bits_per_step,
            self.tile_rows,
            self.tile_cols,
            self.rotation_seed,
            bias,
        )
