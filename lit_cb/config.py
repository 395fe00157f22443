"""Run configuration: typed dataclasses, filled from YAML plus ``key.sub=value`` overrides.

Every section is a dataclass that validates itself, so a typo or a bad value fails before any
model is loaded, with the key and what is allowed in the message.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lit_cb.architectures import FAMILIES
from lit_cb.compress import CompressionConfig
from lit_cb.data.datamodule import DataConfig
from lit_cb.models import DTYPES, EMBEDDED_MODELS
from lit_cb.recovery import RecoveryConfig
from lit_cb.typed_config import build

ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "bf16-true", "16-true")
AUTOCAST = (None, "float16", "bfloat16")


@dataclass
class ModelConfig:
    name: str = "smollm2"
    dtype: str = "float32"
    requires_gpu: bool = False
    # The model family (lit_cb.architectures.FAMILIES): checked against the weights' config.json
    # before any work; required in configs whose model.name is a placeholder path.
    architecture: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype={self.dtype!r}; allowed: {sorted(DTYPES)}")
        if self.architecture is not None and self.architecture not in FAMILIES:
            raise ValueError(f"model.architecture={self.architecture!r}; allowed: {sorted(FAMILIES)}")
        if not self.name:
            raise ValueError(f"model.name must be a folder, a hub id or one of {sorted(EMBEDDED_MODELS)}")


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    val_check_interval: int | None = None
    log_every_n_steps: int = 10
    accumulate_grad_batches: int = 1
    # Deterministic kernels for the whole run (compression too): GPU k-means and codebook gradients
    # otherwise sum with atomics, and two runs of one config differ (AQLM 2x8: 75.47 vs 78.79 ppl).
    # Ops with no deterministic kernel only warn.
    deterministic: bool = True

    def __post_init__(self) -> None:
        if self.accelerator not in ACCELERATORS:
            raise ValueError(f"trainer.accelerator={self.accelerator!r}; allowed: {list(ACCELERATORS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"trainer.precision={self.precision!r}; allowed: {list(PRECISIONS)}")
        if self.num_nodes < 1:
            raise ValueError(f"trainer.num_nodes={self.num_nodes} must be >= 1")
        for name in ("accumulate_grad_batches", "log_every_n_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"trainer.{name}={value!r} must be an integer >= 1")
        if self.val_check_interval is not None and (
            isinstance(self.val_check_interval, bool)
            or not isinstance(self.val_check_interval, int)
            or self.val_check_interval < 1
        ):
            raise ValueError(f"trainer.val_check_interval={self.val_check_interval!r} must be an integer >= 1 or null")


@dataclass
class EvalConfig:
    float_model: bool = True
    compressed: bool = True
    recovered: bool = True
    autocast_dtype: str | None = None
    batch_size: int = 1

    def __post_init__(self) -> None:
        if self.autocast_dtype not in AUTOCAST:
            raise ValueError(f"eval.autocast_dtype={self.autocast_dtype!r}; allowed: {list(AUTOCAST)}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"eval.batch_size={self.batch_size!r} must be an integer >= 1")


@dataclass
class RunConfig:
    run_name: str = "run"
    output_dir: str = "outputs"
    seed: int = 0
    # resume=true continues the run in run_dir if its fingerprint matches; resume=false refuses a
    # non-empty run_dir. overwrite=true starts over in it after moving the old one aside.
    resume: bool = True
    overwrite: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    def to_dict(self) -> dict:
        return asdict(self)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], YAML-parsed value)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    if not key:
        raise ValueError(f"override {text!r} has an empty key")
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, cls: type = RunConfig):
    """YAML file (optional) + overrides -> validated ``cls`` (a :class:`RunConfig` by default)."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} does not exist")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {p} must hold a mapping at the top level")
    for text in overrides or []:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {text!r}: {k} is not a section")
        node[keys[-1]] = value
    return build(cls, data)


def save_config(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
