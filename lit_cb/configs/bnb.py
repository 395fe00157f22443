"""Config of the bitsandbytes 4-bit baseline (the swap lives in :mod:`lit_cb.quant.bnb`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

QuantType = Literal["nf4", "fp4"]
ComputeDtype = Literal["float16", "bfloat16", "float32"]
QuantStorage = Literal["uint8", "float16", "bfloat16", "float32"]

QUANT_TYPES = get_args(QuantType)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
COMPUTE_DTYPE_NAMES = get_args(ComputeDtype)
QUANT_STORAGE_NAMES = get_args(QuantStorage)


@dataclass(frozen=True)
class BnbConfig:
    """bitsandbytes 4-bit settings: ``quant_type`` "nf4"|"fp4"; ``blocksize`` weights per absmax
    (32..4096, powers of two); ``compute_dtype`` "float16"|"bfloat16"|"float32" (the matmul dtype);
    ``quant_storage`` dtype name of the packed storage (uint8 unless FSDP needs another);
    ``compress_statistics`` bitsandbytes' double quantization of the absmax values."""

    quant_type: QuantType = "nf4"
    """4-bit data type."""
    blocksize: int = 64
    """Weights per absmax, a power of two in 32..4096."""
    compute_dtype: ComputeDtype = "float16"
    """dtype of the matmul."""
    quant_storage: QuantStorage = "uint8"
    """dtype of the packed storage (uint8 unless FSDP needs another)."""
    compress_statistics: bool = False
    """bitsandbytes' double quantization of the absmax values."""

    def __post_init__(self) -> None:
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type={self.quant_type!r} is not supported; use one of {QUANT_TYPES}")
        if isinstance(self.blocksize, bool) or self.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize={self.blocksize!r} is not supported; use one of {BLOCKSIZES}")
        if self.compute_dtype not in COMPUTE_DTYPE_NAMES:
            raise ValueError(
                f"compute_dtype={self.compute_dtype!r} is not supported; use one of {tuple(COMPUTE_DTYPE_NAMES)}"
            )
        if self.quant_storage not in QUANT_STORAGE_NAMES:
            raise ValueError(
                f"quant_storage={self.quant_storage!r} is not supported; use one of {tuple(QUANT_STORAGE_NAMES)}"
            )
        if not isinstance(self.compress_statistics, bool):
            raise ValueError(f"compress_statistics={self.compress_statistics!r} must be a bool")

    @property
    def torch_compute_dtype(self):
        from lit_cb.quant.bnb import COMPUTE_DTYPES

        return COMPUTE_DTYPES[self.compute_dtype]

    @property
    def torch_quant_storage(self):
        from lit_cb.quant.bnb import QUANT_STORAGES

        return QUANT_STORAGES[self.quant_storage]
