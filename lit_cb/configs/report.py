"""Config of the comparison report (the report itself lives in :mod:`lit_cb.report`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from lit_cb.configs.bnb import BnbConfig
from lit_cb.configs.compression import CompressionConfig
from lit_cb.configs.data import DataConfig
from lit_cb.configs.dense import GPTQConfig, RTNConfig
from lit_cb.configs.recovery import RecoveryConfig
from lit_cb.configs.run import DTYPE_NAMES, DtypeName, ModelConfig, TrainerConfig
from lit_cb.typed_config import build

ReportMethod = Literal[
    "fp16",
    "bnb_nf4",
    "bnb_fp4",
    "qlora_nf4",
    "rtn_2bit",
    "rtn_3bit",
    "rtn_4bit",
    "gptq_2bit",
    "gptq_3bit",
    "gptq_4bit",
]
METHODS = get_args(ReportMethod)
# Compression-driver fields a report may set (method and method_config come from the row name).
_DRIVER_KEYS = ("targets", "true_sequential", "hessian_dtype", "forward_batch_size", "offload_activations")


def _qlora_recovery_default() -> RecoveryConfig:
    # Pure KL from the float model at a small learning rate: cross-entropy on C4 at 2e-4 pulled the
    # 4-bit instruct model away from its own distribution (WikiText-2 49.0 vs 27.4 for plain NF4 on
    # the H100); distillation can only move it towards the float model.
    return RecoveryConfig(max_steps=100, lr=5e-5, warmup_steps=10, lora_r=16, lora_alpha=32, distill_alpha=1.0)


@dataclass
class ReportEvalConfig:
    """``dtype``: the dtype every row's model is cast to for evaluation (``float16`` on a GPU
    reproduces the reference protocol; ``float32`` on a CPU, which has no fast fp16 matmul).
    Autocast is always off, so the dtype is the arithmetic. ``batch_size``: windows per forward."""

    dtype: DtypeName = "float32"
    """dtype every row's model is cast to for evaluation (float16 on a GPU: the reference protocol)."""
    batch_size: int = 1
    """Evaluation windows per forward (>= 1)."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"eval.dtype={self.dtype!r}; allowed: {sorted(DTYPE_NAMES)}")
        if self.batch_size < 1:
            raise ValueError(f"eval.batch_size={self.batch_size} must be >= 1")


@dataclass
class ReportConfig:
    """What the report runs. ``methods`` are computed here (see :data:`METHODS`); ``collect``
    lists finished lit_cb run directories (or ``name=dir``) whose ``metrics.json`` rows are added.

    ``rtn`` / ``gptq`` hold extra fields of :class:`RTNConfig` / :class:`GPTQConfig` (the bit width
    comes from the row name); ``bnb`` the fields of :class:`BnbConfig` except ``quant_type``
    (``compute_dtype`` null = ``eval.dtype``); ``compression`` the driver fields of
    :class:`CompressionConfig` (forward_batch_size, hessian_dtype, ...); ``recovery`` and
    ``trainer`` drive the QLoRA row's Lightning fit. ``trainer.accelerator`` also picks the device
    of every row.
    """

    run_name: str = "report"
    """Name of the report folder under output_dir."""
    output_dir: str = "outputs"
    """Where report folders go."""
    seed: int = 0
    """Seed of everything."""
    methods: list[ReportMethod] = field(default_factory=lambda: ["fp16", "bnb_nf4", "rtn_3bit", "gptq_3bit"])
    """Rows computed here, each method once."""
    collect: list[str] = field(default_factory=list)
    """Finished lit_cb run folders (or name=folder) whose metrics.json rows are added."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: ReportEvalConfig = field(default_factory=ReportEvalConfig)
    rtn: dict[str, Any] = field(default_factory=lambda: {"group_size": -1})
    """Fields of the RTN rows' config (bits come from the row name); listed below."""
    gptq: dict[str, Any] = field(default_factory=lambda: {"group_size": -1, "damp": 0.01})
    """Fields of the GPTQ rows' config (bits come from the row name); listed below."""
    bnb: dict[str, Any] = field(default_factory=lambda: {"blocksize": 64, "compute_dtype": None})
    """Fields of the bitsandbytes rows' config except quant_type (compute_dtype null: eval.dtype); listed below."""
    compression: dict[str, Any] = field(default_factory=lambda: {"forward_batch_size": 8})
    """Compression-driver fields of the RTN/GPTQ rows (targets, true_sequential, hessian_dtype, ...)."""
    recovery: RecoveryConfig = field(default_factory=_qlora_recovery_default)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        if isinstance(self.methods, str) or not isinstance(self.methods, list):
            raise ValueError(f"methods={self.methods!r} must be a list of method names; allowed: {list(METHODS)}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown report method(s) {bad}; allowed: {list(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods={self.methods} lists a method twice")
        if not self.methods and not self.collect:
            raise ValueError("the report has nothing to do: methods and collect are both empty")
        # Validate the per-method settings now, before any model is loaded.
        self.rtn_config(4)
        self.gptq_config(4)
        self.bnb_config("nf4")
        self.compression_config("rtn", {"bits": 4, **self.rtn})
        for entry in self.collect:
            _parse_collect(entry)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    def rtn_config(self, bits: int) -> RTNConfig:
        return build(RTNConfig, {**self.rtn, "bits": bits}, "rtn")

    def gptq_config(self, bits: int) -> GPTQConfig:
        return build(GPTQConfig, {**self.gptq, "bits": bits}, "gptq")

    def bnb_config(self, quant_type: str) -> BnbConfig:
        values = dict(self.bnb)
        if values.get("compute_dtype") is None:
            values["compute_dtype"] = self.eval.dtype
        if "quant_type" in values:
            raise ValueError("bnb.quant_type is set by the row name (bnb_nf4 / bnb_fp4); remove it")
        return build(BnbConfig, {**values, "quant_type": quant_type}, "bnb")

    def compression_config(self, method: str, method_config: dict) -> CompressionConfig:
        unknown = sorted(set(self.compression) - set(_DRIVER_KEYS))
        if unknown:
            raise ValueError(f"compression: unknown or fixed key(s) {unknown}; allowed: {list(_DRIVER_KEYS)}")
        return CompressionConfig(method=method, method_config=method_config, **self.compression)

    def to_dict(self) -> dict:
        return asdict(self)


def _parse_collect(entry: str) -> tuple[str | None, Path]:
    """``"dir"`` or ``"name=dir"`` -> (row name or None, run directory)."""
    if not isinstance(entry, str) or not entry:
        raise ValueError(f"collect entry {entry!r} must be a run directory or name=directory")
    name, sep, path = entry.partition("=")
    return (name, Path(path)) if sep else (None, Path(entry))
