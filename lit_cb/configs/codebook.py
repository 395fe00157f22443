"""Config of the LLM-Codebook quantizer (the transform lives in :mod:`lit_cb.quant.codebook`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from lit_cb.typed_config import build

Weighting = Literal["hessian_diag", "gptvq", "none"]
Init = Literal["kmeans++", "random"]
Scale = Literal["row_max", "row_norm"]
GptvqFitWeights = Literal["hessian_diag", "hinv_chol"]

ALLOWED_IN_GROUP_SIZES = (1, 2, 4, 8)
MIN_NBITS, MAX_NBITS = 2, 16
WEIGHTINGS = get_args(Weighting)
INITS = get_args(Init)
SCALES = (*get_args(Scale), None)
GPTVQ_FIT_WEIGHTS = get_args(GptvqFitWeights)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class CodebookConfig:
    """Settings of the LLM-Codebook quantizer (one ``2**nbits`` x ``in_group_size`` codebook per layer).

    ``damp`` is relative: ``H + damp * mean(diag H) * I`` (as in GPTQ), which keeps the Cholesky
    factorisation of the inverse stable for rank-deficient calibration Hessians.

    Defaults were picked on real SmolLM2-135M layers (relative layer error at ~2.08 bits/weight):
    "gptvq" is 3-6x better than "hessian_diag" and ~5-15x better than "none"; fitting its codebook
    with GPTQ's saliency ``1 / U_jj²`` ("hinv_chol") beats ``diag(H)`` by ~1%; the per-row RMS scale
    ("row_norm") is on par with "row_max" and ~10% better than no scale. ``kmeans_max_points``
    bounds the vectors used in the main k-means iterations (for CPU speed; ``None`` = all, which
    costs about the same on a GPU and is ~1% better).
    """

    in_group_size: int = 4
    """Consecutive input weights per codeword, one of 1, 2, 4, 8 (bits/weight ~ nbits / in_group_size)."""
    nbits: int = 8
    """Bits per code: the codebook has 2**nbits centroids (2..16)."""
    weighting: Weighting = "gptvq"
    """How the layer objective weights the clustering: GPTQ-style error feedback, diag(H), or plain k-means."""
    kmeans_iters: int = 30
    """Lloyd iterations of the codebook fit (>= 0)."""
    init: Init = "kmeans++"
    """How the k-means centroids start."""
    seed: int = 0
    """Seed of the k-means initialisation and subsampling."""
    damp: float = 0.01
    """Hessian dampening as a fraction of mean(diag H) (finite, >= 0)."""
    gptvq_block_size: int = 128
    """Columns per lazy error-feedback block of "gptvq" (a positive multiple of in_group_size)."""
    gptvq_fit_weights: GptvqFitWeights = "hinv_chol"
    """Per-coordinate weights of the "gptvq" codebook fit: GPTQ's saliency 1/U_jj² or diag(H)."""
    scale: Scale | None = "row_norm"
    """Per-row scale the weights are divided by before clustering (null: none)."""
    codebook_update_steps: int = 10
    """Conjugate-gradient steps on the codebook against the full objective, codes fixed (>= 0)."""
    kmeans_max_points: int | None = 65536
    """Vectors used in the main k-means iterations (>= 2**nbits; null: all)."""

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"CodebookConfig.{name}={getattr(self, name)!r} is invalid; allowed: {allowed}")

        if not _is_int(self.in_group_size) or self.in_group_size not in ALLOWED_IN_GROUP_SIZES:
            raise bad("in_group_size", f"one of {ALLOWED_IN_GROUP_SIZES}")
        if not _is_int(self.nbits) or not MIN_NBITS <= self.nbits <= MAX_NBITS:
            raise bad("nbits", f"an integer in [{MIN_NBITS}, {MAX_NBITS}]")
        if self.weighting not in WEIGHTINGS:
            raise bad("weighting", f"one of {WEIGHTINGS}")
        if not _is_int(self.kmeans_iters) or self.kmeans_iters < 0:
            raise bad("kmeans_iters", "an integer >= 0")
        if self.init not in INITS:
            raise bad("init", f"one of {INITS}")
        if not _is_int(self.seed):
            raise bad("seed", "an integer")
        if isinstance(self.damp, bool) or not isinstance(self.damp, int | float) or not (0.0 <= self.damp < math.inf):
            raise bad("damp", "a finite float >= 0")
        if (
            not _is_int(self.gptvq_block_size)
            or self.gptvq_block_size < self.in_group_size
            or self.gptvq_block_size % self.in_group_size
        ):
            raise bad("gptvq_block_size", f"a positive multiple of in_group_size={self.in_group_size}")
        if self.gptvq_fit_weights not in GPTVQ_FIT_WEIGHTS:
            raise bad("gptvq_fit_weights", f"one of {GPTVQ_FIT_WEIGHTS}")
        if self.scale not in SCALES:
            raise bad("scale", f"one of {SCALES}")
        if not _is_int(self.codebook_update_steps) or self.codebook_update_steps < 0:
            raise bad("codebook_update_steps", "an integer >= 0")
        if self.kmeans_max_points is not None and (
            not _is_int(self.kmeans_max_points) or self.kmeans_max_points < 2**self.nbits
        ):
            raise bad("kmeans_max_points", f"None (all vectors) or an integer >= 2**nbits={2**self.nbits}")

    @property
    def codebook_size(self) -> int:
        return 2**self.nbits

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CodebookConfig:
        """Inverse of :meth:`to_dict`; unknown keys and wrong types raise, naming the field."""
        return build(cls, d, "CodebookConfig")

    def make_format(self, in_features: int, out_features: int, bias: bool):
        """The :class:`lit_cb.layers.CodebookFormat` of one layer (imports torch)."""
        from lit_cb.layers import CodebookFormat

        return CodebookFormat(
            in_features=in_features,
            out_features=out_features,
            in_group_size=self.in_group_size,
            out_group_size=1,
            num_codebooks=1,
            nbits_per_codebook=self.nbits,
            bias=bias,
        )
