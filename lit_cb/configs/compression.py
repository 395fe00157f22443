"""Config of the sequential compression driver (the driver lives in :mod:`lit_cb.compress`)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

from lit_cb.architectures import DEFAULT_TARGETS
from lit_cb.configs import methods as registry
from lit_cb.typed_config import build

HessianDtype = Literal["float32", "float64"]
# Names of lit_cb.hessian.HESSIAN_DTYPES (that dict holds torch dtypes; a test keeps the two equal).
HESSIAN_DTYPE_NAMES = get_args(HessianDtype)
# Methods whose layers hold discrete codes into codebooks (lit_cb.layers.CodebookFormat): what code training
# (recovery.code_update_every, recovery.ste_codes) re-assigns.
CODEBOOK_METHODS = ("aqlm", "codebook")
# Methods whose layer formats count their exact bits (storage_bits), which bit_budget allocates: the codebook
# formats, and the trellis (lit_cb.trellis.TrellisFormat, its bits_per_step per layer).
MIXED_PRECISION_METHODS = (*CODEBOOK_METHODS, "trellis")
SensitivityWeighting = Literal["relative", "fisher"]
SENSITIVITY_WEIGHTINGS = get_args(SensitivityWeighting)
RowWeighting = Literal["none", "fisher"]
ROW_WEIGHTINGS = get_args(RowWeighting)
# Methods whose quantizer takes per-output-row weights (compression.row_weighting).
ROW_WEIGHTED_METHODS = ("codebook",)
# Keys added after runs were already on disk, with the default that reproduces those runs: made_with()
# leaves them out at that default, so blocks and allocations written before the key existed still resume.
_ADDED_LATER = {"sensitivity_weighting": "relative", "row_weighting": "none"}


@dataclass
class CompressionConfig:
    """What to compress and how. ``method`` names a registered method; ``method_config`` holds
    the fields of that method's config dataclass."""

    method: str = "codebook"
    """Compression method (a registered name; its settings go in method_config)."""
    method_config: dict[str, Any] = field(default_factory=dict)
    """Fields of the method's config dataclass (listed below per method)."""
    targets: str = DEFAULT_TARGETS
    """Regular expression selecting the linears to compress (searched in module names)."""
    keep_dense: int = 0
    """Number of most Hessian-salient target linears left dense (>= 0)."""
    true_sequential: bool = True
    """Re-collect a block's Hessians after each group of linears (q/k/v, o, gate/up, down)."""
    hessian_dtype: HessianDtype = "float32"
    """dtype the Hessians XᵀX are accumulated in."""
    forward_batch_size: int = 8
    """Calibration windows per block forward (>= 1)."""
    offload_activations: bool = False
    """Keep the block inputs/outputs on the CPU between blocks (saves GPU memory)."""
    block_finetune: dict[str, Any] | None = None
    """Block fine-tuning after each block (null: off); fields listed below."""
    bit_budget: float | None = None
    """Average bits/weight over the compressed linears; each layer takes one of bit_options,
    chosen by measured sensitivity (null: all use method_config)."""
    bit_options: list[dict[str, Any]] | None = None
    """method_config overrides the layers choose from under bit_budget, e.g. [{nbits: 8},
    {nbits: 9}] ({} = method_config itself)."""
    blocks_from: str | None = None
    """Another run's folder whose finished blocks this new run starts from (copied in; the compression
    settings, model and data must match): compress once, recover several ways (null: compress here)."""
    sensitivity_max_rows: int | None = 512
    """Weight rows per layer (a seeded subsample) the bit_budget sensitivity pass quantizes each
    option on (null: all)."""
    sensitivity_weighting: SensitivityWeighting = "relative"
    """What bit_budget minimises: "relative" (each layer's share of output energy lost, every layer
    alike) or "fisher" (each output's error weighted by the float model's empirical Fisher of the
    language-model loss: the estimated loss increase; one backward pass per window with the whole model
    on the device, so a 7B model needs a GPU that holds it and one window's activations)."""
    row_weighting: RowWeighting = "none"
    """How each layer's quantizer weighs its output rows: "none" (alike: tr(ΔW H ΔWᵀ)) or "fisher"
    (each row by the float model's empirical Fisher of that output, measured once before the first
    block and kept in <run>/blocks/output_fisher.safetensors: one shared codebook then fits the
    outputs whose error costs the loss most; the same whole-model backward pass as
    sensitivity_weighting=fisher). Methods: codebook."""

    def __post_init__(self) -> None:
        registry.config_class(self.method)  # raises with the list of known methods
        if self.keep_dense < 0:
            raise ValueError(f"compression.keep_dense={self.keep_dense} must be >= 0")
        if self.hessian_dtype not in HESSIAN_DTYPE_NAMES:
            raise ValueError(
                f"compression.hessian_dtype={self.hessian_dtype!r}; allowed: {sorted(HESSIAN_DTYPE_NAMES)}"
            )
        if self.forward_batch_size < 1:
            raise ValueError(f"compression.forward_batch_size={self.forward_batch_size} must be >= 1")
        try:
            re.compile(self.targets)
        except re.error as err:
            raise ValueError(f"compression.targets={self.targets!r} is not a valid regular expression: {err}") from err
        self.method_settings()  # validate the method's own fields now, not after calibration
        self.finetune_settings()
        self.bit_option_settings()
        if self.sensitivity_weighting not in SENSITIVITY_WEIGHTINGS:
            raise ValueError(
                f"compression.sensitivity_weighting={self.sensitivity_weighting!r}; "
                f"allowed: {list(SENSITIVITY_WEIGHTINGS)}"
            )
        if self.row_weighting not in ROW_WEIGHTINGS:
            raise ValueError(f"compression.row_weighting={self.row_weighting!r}; allowed: {list(ROW_WEIGHTINGS)}")
        if self.row_weighting != "none" and self.method not in ROW_WEIGHTED_METHODS:
            raise ValueError(
                f"compression.row_weighting={self.row_weighting!r} needs a method whose quantizer weighs rows; "
                f"compression.method={self.method!r}, allowed: {list(ROW_WEIGHTED_METHODS)} (or row_weighting='none')"
            )
        if self.sensitivity_max_rows is not None and self.sensitivity_max_rows < 1:
            raise ValueError(
                f"compression.sensitivity_max_rows={self.sensitivity_max_rows} must be >= 1 or null (all rows)"
            )

    def method_settings(self):
        cls = registry.config_class(self.method)
        return build(cls, self.method_config, "compression.method_config")

    def bit_option_settings(self) -> list:
        """The method config of every entry of ``bit_options`` (``method_config`` updated by it), in
        order; empty without a ``bit_budget``. Each must be a valid config of the method, and no
        two alike."""
        if self.bit_budget is None:
            if self.bit_options is not None:
                raise ValueError(
                    "compression.bit_options is set but compression.bit_budget is null; set a budget "
                    "(average bits/weight) or remove the options"
                )
            return []
        budget = self.bit_budget
        if isinstance(budget, bool) or not isinstance(budget, int | float) or not 0 < budget < float("inf"):
            raise ValueError(f"compression.bit_budget={budget!r} must be a finite number of bits per weight > 0")
        if self.method not in MIXED_PRECISION_METHODS:
            raise ValueError(
                f"compression.bit_budget needs a method with per-layer formats; compression.method={self.method!r}, "
                f"allowed: {list(MIXED_PRECISION_METHODS)}"
            )
        if not self.bit_options:
            raise ValueError(
                f"compression.bit_budget={budget} needs compression.bit_options, a list of at least one "
                "method_config override, e.g. [{nbits: 8}, {nbits: 9}, {nbits: 10}]"
            )
        cls = registry.config_class(self.method)
        settings = []
        for i, option in enumerate(self.bit_options):
            where = f"compression.bit_options[{i}]"
            if not isinstance(option, dict):
                raise ValueError(f"{where}={option!r} must be a mapping of method_config overrides")
            settings.append(build(cls, {**self.method_config, **option}, where))
        for i, a in enumerate(settings):
            for j in range(i):
                if settings[j] == a:
                    raise ValueError(
                        f"compression.bit_options[{i}]={self.bit_options[i]!r} gives the same config as "
                        f"compression.bit_options[{j}]={self.bit_options[j]!r}; list each option once"
                    )
        return settings

    def finetune_settings(self):
        if self.block_finetune is None:
            return None
        from lit_cb.configs.block_finetune import BlockFinetuneConfig

        return build(BlockFinetuneConfig, self.block_finetune, "compression.block_finetune")

    def to_dict(self) -> dict:
        return asdict(self)

    def made_with(self) -> dict:
        """The settings finished blocks and bit allocations record and are checked against on resume:
        everything but ``blocks_from``, which says where a run's blocks were copied from, not what they
        were made with (a run started from another's blocks resumes them as its own), and keys added
        later while at the default that reproduces older runs (so those runs still resume)."""
        return {
            k: v
            for k, v in self.to_dict().items()
            if k != "blocks_from" and not (k in _ADDED_LATER and v == _ADDED_LATER[k])
        }
