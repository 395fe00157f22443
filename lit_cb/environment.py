"""Where a run computes and with what: the device and package versions recorded next to its figures.

A perplexity or a time means little without the machine and the versions that made it, and a figure
collected later on another machine (a benchmark's JSON assembled from runs on a lent GPU) must not
take that machine's name. So every run writes its own environment into ``metrics.json``, and the
report records the same for its rows.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import shlex
import sys

import torch

VERSIONED_PACKAGES = ("lit_cb", "torch", "triton", "transformers", "lightning", "peft", "bitsandbytes")


def package_versions() -> dict[str, str | None]:
    """Python's version and each of :data:`VERSIONED_PACKAGES`'s (None: not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in VERSIONED_PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def device_description(device: torch.device) -> str:
    """``"NVIDIA H200 (CUDA 13.0)"``, or the CPU and its thread count."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    parts = ["CPU", platform.machine(), platform.processor()]
    return " ".join(p for p in parts if p) + f" ({torch.get_num_threads()} threads)"


def run_environment(device: torch.device) -> dict:
    """The device, the versions, the UTC date and the command line of this process."""
    return {
        "device": device_description(device),
        "versions": package_versions(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
    }
