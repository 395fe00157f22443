"""Config of the texts a run uses (the LightningDataModule lives in :mod:`lit_cb.data.datamodule`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

SAMPLING_MODES = ("document", "concat")


@dataclass
class DataConfig:
    """Which texts to use and how to cut them. Sources are shipped names (``c4``,
    ``wikitext2``) or local file paths."""

    calibration_source: str = "c4"
    """Calibration documents: a shipped name (c4, wikitext2) or a .jsonl/.json/.txt[.xz] file."""
    finetune_source: str = "c4"
    """Recovery fine-tuning documents (same forms as calibration_source)."""
    eval_source: str = "wikitext2"
    """Evaluation text, read verbatim (a shipped name or a file)."""
    num_calibration_samples: int = 128
    """Calibration windows (>= 1)."""
    calibration_seqlen: int = 2048
    """Tokens per calibration window (>= 1)."""
    calibration_sampling: Literal["document", "concat"] = "document"
    """document: a random window of a random long-enough document (GPTQ/AQLM); concat: of the joined text."""
    num_finetune_samples: int = 512
    """Recovery training windows (>= 1)."""
    finetune_seqlen: int = 2048
    """Tokens per recovery window (>= 1)."""
    num_val_samples: int = 16
    """Held-out recovery validation windows (>= 0)."""
    val_fraction_docs: float = 0.1
    """Fraction of the fine-tuning documents reserved for validation, in (0, 1)."""
    eval_seqlen: int = 2048
    """Tokens per evaluation window (>= 1)."""
    max_eval_windows: int | None = None
    """Evaluate on the first N windows only (>= 1; null: the whole text)."""
    batch_size: int = 1
    """Training and calibration windows per batch (>= 1)."""
    eval_batch_size: int = 1
    """Validation windows per batch (>= 1)."""
    text_field: str = "text"
    """Field holding the text in .jsonl/.json documents."""
    seed: int = 0
    """Seed of the window sampling."""
    num_workers: int = 0
    """DataLoader worker processes."""
    num_teacher_samples: int = 0
    """Sequences sampled from the float model and added to the recovery training set (>= 0; 0: off)."""
    teacher_seqlen: int | None = None
    """Tokens per teacher sequence (null: finetune_seqlen). A multiple of finetune_seqlen is cut into
    windows; a divisor of it is packed, finetune_seqlen / teacher_seqlen sequences back to back per
    window (then num_teacher_samples must be a multiple of that count). Shorter sequences are far
    cheaper to sample: the static KV cache spans the whole sequence, so every decode step reads
    teacher_seqlen cached positions per row."""
    teacher_temperature: float = 1.0
    """Sampling temperature of the teacher text (> 0)."""
    teacher_top_p: float = 1.0
    """Nucleus (top-p) cut of the teacher text sampling, in (0, 1] (1: the full distribution)."""
    teacher_batch_size: int = 64
    """Sequences generated per batch (>= 1; part of the teacher-text cache's fingerprint)."""
    teacher_seed: int | None = None
    """Seed of the teacher text alone, prompts from all documents (>= 0; null: from data.seed, as before)."""
    teacher_cache_dir: str | None = None
    """Shared teacher-text cache, one subfolder per setting (null: <run>/teacher_text, per run)."""

    def __post_init__(self) -> None:
        for name in (
            "num_calibration_samples",
            "calibration_seqlen",
            "num_finetune_samples",
            "finetune_seqlen",
            "eval_seqlen",
            "batch_size",
            "eval_batch_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{name}={value!r} must be a positive integer")
        if self.num_val_samples < 0:
            raise ValueError(f"data.num_val_samples={self.num_val_samples} must be >= 0")
        if self.calibration_sampling not in SAMPLING_MODES:
            raise ValueError(
                f"data.calibration_sampling={self.calibration_sampling!r}; allowed: {list(SAMPLING_MODES)}"
            )
        if not 0.0 < self.val_fraction_docs < 1.0:
            raise ValueError(f"data.val_fraction_docs={self.val_fraction_docs} must lie in (0, 1)")
        self._check_teacher()
        if self.max_eval_windows is not None and self.max_eval_windows < 1:
            raise ValueError(f"data.max_eval_windows={self.max_eval_windows} must be >= 1 or null (all)")

    def _check_teacher(self) -> None:
        n = self.num_teacher_samples
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"data.num_teacher_samples={n!r} must be an integer >= 0 (0: no teacher text)")
        b = self.teacher_batch_size
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"data.teacher_batch_size={b!r} must be a positive integer")
        if not self.teacher_temperature > 0:
            raise ValueError(f"data.teacher_temperature={self.teacher_temperature!r} must be > 0")
        if not 0.0 < self.teacher_top_p <= 1.0:
            raise ValueError(f"data.teacher_top_p={self.teacher_top_p!r} must lie in (0, 1]")
        seed = self.teacher_seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"data.teacher_seed={seed!r} must be an integer >= 0 or null (null: from data.seed)")
        where = self.teacher_cache_dir
        if where is not None and (not isinstance(where, str) or not where.strip()):
            raise ValueError(
                f"data.teacher_cache_dir={where!r} must be a non-empty folder path or null (null: <run>/teacher_text)"
            )
        seqlen = self.teacher_seqlen
        if seqlen is not None and (isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 1):
            raise ValueError(f"data.teacher_seqlen={seqlen!r} must be a positive integer or null (finetune_seqlen)")
        if seqlen is not None and seqlen % self.finetune_seqlen and self.finetune_seqlen % seqlen:
            raise ValueError(
                f"data.teacher_seqlen={seqlen} must be a multiple of data.finetune_seqlen={self.finetune_seqlen} "
                "(teacher sequences are cut into training windows), a divisor of it (sequences are packed into "
                "windows), or null"
            )
        if seqlen is not None and seqlen < self.finetune_seqlen:
            per_window = self.finetune_seqlen // seqlen
            if self.num_teacher_samples % per_window:
                raise ValueError(
                    f"data.num_teacher_samples={self.num_teacher_samples} must be a multiple of {per_window}: "
                    f"data.teacher_seqlen={seqlen} packs {per_window} sequences into each "
                    f"data.finetune_seqlen={self.finetune_seqlen} window"
                )

    @property
    def teacher_sequence_length(self) -> int:
        """Tokens per teacher sequence (``teacher_seqlen``, or ``finetune_seqlen`` when null)."""
        return self.teacher_seqlen or self.finetune_seqlen

    def to_dict(self) -> dict:
        return asdict(self)
