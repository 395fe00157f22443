"""Calibration, fine-tuning and evaluation data (texts for the embedded default ship with the package)."""

from lit_cb.data.datamodule import CompressionDataModule, DataConfig
from lit_cb.data.texts import embedded_text_path, read_eval_text

__all__ = ["CompressionDataModule", "DataConfig", "embedded_text_path", "read_eval_text"]
