"""Config of ``lit_cb evaluate``: the perplexity of a saved model (the evaluation lives in
:mod:`lit_cb.evaluate`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lit_cb.configs.run import AUTOCAST, Accelerator, AutocastDtype


@dataclass
class EvaluateConfig:
    model_dir: str = ""
    """What to measure: a lit_cb model folder (<run>/model) or its run folder, an AQLM folder, any Hugging Face
    causal-LM folder, or an embedded model's name (smollm2)."""
    eval_source: str | None = None
    """Evaluation text (a shipped name or a file; null: the one the saving run used, else wikitext2)."""
    eval_seqlen: int | None = None
    """Tokens per window (>= 1; null: the saving run's, else 2048)."""
    max_eval_windows: int | None = None
    """First N windows only (>= 1; 0: the whole text; null: the saving run's setting)."""
    batch_size: int = 1
    """Windows per forward (>= 1)."""
    autocast_dtype: AutocastDtype | None = None
    """Evaluate under torch.autocast in this dtype (null: no autocast)."""
    accelerator: Accelerator = "auto"
    """Where to evaluate (auto: the GPU when there is one)."""
    output: str | None = None
    """Also write the result to this JSON file (null: print only)."""

    def __post_init__(self) -> None:
        if not self.model_dir:
            raise ValueError("model_dir is required: lit_cb evaluate <model folder> [key=value ...]")
        if self.eval_seqlen is not None and self.eval_seqlen < 1:
            raise ValueError(f"eval_seqlen={self.eval_seqlen} must be >= 1 or null")
        if self.max_eval_windows is not None and self.max_eval_windows < 0:
            raise ValueError(f"max_eval_windows={self.max_eval_windows} must be >= 0 (0: all) or null")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if self.autocast_dtype not in AUTOCAST:
            raise ValueError(f"autocast_dtype={self.autocast_dtype!r}; allowed: {list(AUTOCAST)}")

    def to_dict(self) -> dict:
        return asdict(self)
