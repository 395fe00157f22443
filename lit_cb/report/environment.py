"""Where a report runs: its device (the versions and the device description: :mod:`lit_cb.environment`)."""

from __future__ import annotations

import torch

from lit_cb.config import TrainerConfig


def report_device(trainer: TrainerConfig) -> torch.device:
    """The device every row runs on: CUDA when asked for (or 'auto' and present), else CPU."""
    if trainer.accelerator in ("gpu", "cuda") or (trainer.accelerator == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.accelerator asks for a GPU but torch sees none")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
