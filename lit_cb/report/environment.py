"""Where a report runs and with what: its device and the package versions recorded next to its rows."""

from __future__ import annotations

import importlib.metadata
import platform

import torch

from lit_cb.config import TrainerConfig

VERSIONED_PACKAGES = ("lit_cb", "torch", "transformers", "lightning", "peft", "bitsandbytes")


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


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in VERSIONED_PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU {platform.machine()} {platform.processor() or ''} ({torch.get_num_threads()} threads)".strip()
