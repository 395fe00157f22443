"""Config of recovery fine-tuning (the LightningModule lives in :mod:`lit_cb.recovery`)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from lit_cb.architectures import DEFAULT_LORA_TARGETS
from lit_cb.configs.format import LOW_RANK_BITS


@dataclass
class RecoveryConfig:
    max_steps: int = 200
    """Optimizer steps of recovery fine-tuning (>= 0; 0 skips recovery)."""
    lr: float = 2e-4
    """Learning rate of the LoRA adapters and norms (> 0)."""
    codebook_lr: float = 1e-5
    """Learning rate of codebooks and scales when train_codebooks is on (> 0)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 10
    """Steps of linear learning-rate warm-up (then cosine decay to 0 at max_steps)."""
    lora_r: int = 16
    """LoRA rank (>= 0; 0 disables LoRA)."""
    lora_alpha: int = 32
    """LoRA scaling numerator (the adapter is scaled by lora_alpha / lora_r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input."""
    lora_targets: str = DEFAULT_LORA_TARGETS
    """Regular expression selecting the linears that get LoRA adapters."""
    lora_on_compressed: bool = False
    """Put LoRA on compressed linears too (merged into their low-rank slot afterwards)."""
    low_rank_bits: int = 16
    """Bits of each merged low-rank slot entry: 16 (fp16) or 8 (int8, one fp16 scale per rank component,
    half the bits, so twice the rank fits the same bits/weight; the recovered model is evaluated rounded)."""
    train_codebooks: bool = False
    """Train the codebooks and scales of compressed linears (codes stay frozen unless code_update_every > 0)."""
    train_norms: bool = False
    """Train the norm weights."""
    train_embeddings: bool = False
    """Train the float input embedding and output head (one tensor when tied): uncompressed, so the
    bits/weight over the compressed linears stay as they are."""
    embedding_lr: float = 1e-5
    """Learning rate of the embedding and output head when train_embeddings is on (> 0)."""
    ste_codes: bool = False
    """Train the codes too, by a straight-through estimator: each compressed linear keeps a float32
    latent (its dequantized weight over the row scales, so step 0 changes nothing) that the weight
    gradient trains; every forward re-assigns each group to the codeword nearest its latent (one
    codebook per group; 4 bytes per weight plus Adam's 8 while training)."""
    latent_lr: float = 5e-3
    """Learning rate of the ste_codes latents (> 0), in codebook units (weight / row scale). A latent
    starts on its codeword, and g4 B8 codewords lie about 1 apart, so a code changes only after its
    latent drifted about 0.5; on SmolLM2 Adam's drift was about 0.14 x lr per step."""
    distill_alpha: float = 0.0
    """Weight of KL distillation from the float model in the loss, in [0, 1] (0: cross-entropy only)."""
    distill_temperature: float = 1.0
    """Softmax temperature of the distillation (> 0)."""
    grad_clip: float = 1.0
    """Gradient-norm clipping (0: off)."""
    code_update_every: int = 0
    """Re-assign codes (PV-tuning's linearized V-step) every this many optimizer steps (>= 0; 0: off)."""
    code_update_fraction: float = 0.01
    """Share of each compressed linear's groups re-assigned per code update (most moved first), in (0, 1]."""
    code_update_step: float = 0.5
    """Code-update step: the selected groups' targets move by this times the weight's RMS (> 0, scale-free)."""
    code_update_sweeps: int = 2
    """Coordinate-descent sweeps over the codebooks per code update (>= 1; one is exact for one codebook)."""
    code_update_backtracks: int = 3
    """A code update is kept only if it lowers the step's batch loss, else retried at half the step this many times."""
    code_update_offload: bool = False
    """Hold the code updates' weight gradients in CPU memory, one layer on the GPU at a time (7B: 26 GB off the GPU)."""
    val_every_n_steps: int = 0
    """Held-out C4 perplexity every N optimizer steps, into recovery_curve.json/png (>= 0; 0: only at the end)."""
    early_stop_patience: int = 0
    """Stop after this many evaluations without improvement, then restore the best weights (>= 0; 0: off)."""
    early_stop_min_delta: float = 0.0
    """Improvement of the held-out perplexity that counts as better (>= 0)."""
    test_probe_every_n_steps: int = 0
    """Also record WikiText-2 perplexity every N steps, a labelled test-set probe never used to stop (0: off)."""
    cuda_graphs: bool = False
    """Replay the student's forward and backward and the teacher's forward from CUDA graphs at the training
    batch's shape (lit_cb/step_graphs.py: the step is bound by Python and launches, not the GPU), after a
    self-check against eager; falls back to eager, saying why. GPU, one process, codes frozen."""

    def __post_init__(self) -> None:
        if self.max_steps < 0:
            raise ValueError(f"recovery.max_steps={self.max_steps} must be >= 0")
        for name in ("lr", "codebook_lr", "embedding_lr", "latent_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"recovery.{name}={getattr(self, name)} must be > 0")
        if self.lora_r < 0:
            raise ValueError(f"recovery.lora_r={self.lora_r} must be >= 0 (0 disables LoRA)")
        if self.low_rank_bits not in LOW_RANK_BITS:
            raise ValueError(f"recovery.low_rank_bits={self.low_rank_bits} is not allowed; use one of {LOW_RANK_BITS}")
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise ValueError(f"recovery.distill_alpha={self.distill_alpha} must lie in [0, 1]")
        if self.distill_temperature <= 0:
            raise ValueError(f"recovery.distill_temperature={self.distill_temperature} must be > 0")
        if self.ste_codes and self.code_update_every:
            raise ValueError(
                f"recovery.ste_codes=true and recovery.code_update_every={self.code_update_every} both re-assign "
                "codes: choose one (code_update_every=0 with ste_codes, or ste_codes=false)"
            )
        if self.code_update_every < 0:
            raise ValueError(f"recovery.code_update_every={self.code_update_every} must be an integer >= 0 (0: off)")
        if not 0.0 < self.code_update_fraction <= 1.0:
            raise ValueError(f"recovery.code_update_fraction={self.code_update_fraction} must lie in (0, 1]")
        if not self.code_update_step > 0 or self.code_update_step == float("inf"):
            raise ValueError(f"recovery.code_update_step={self.code_update_step} must be a finite number > 0")
        if self.code_update_backtracks < 0:
            raise ValueError(f"recovery.code_update_backtracks={self.code_update_backtracks} must be an integer >= 0")
        if self.code_update_sweeps < 1:
            raise ValueError(f"recovery.code_update_sweeps={self.code_update_sweeps} must be an integer >= 1")
        for name in ("val_every_n_steps", "early_stop_patience", "test_probe_every_n_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"recovery.{name}={value!r} must be an integer >= 0 (0: off)")
        if not self.early_stop_min_delta >= 0:
            raise ValueError(f"recovery.early_stop_min_delta={self.early_stop_min_delta!r} must be >= 0")
        if self.early_stop_patience and not self.val_every_n_steps:
            raise ValueError(
                f"recovery.early_stop_patience={self.early_stop_patience} needs recovery.val_every_n_steps >= 1 "
                "(the held-out perplexity it watches is measured every val_every_n_steps steps)"
            )
        if self.cuda_graphs and (self.code_update_every or self.ste_codes):
            raise ValueError(
                f"recovery.cuda_graphs=true with recovery.code_update_every={self.code_update_every}, "
                f"recovery.ste_codes={self.ste_codes}: a graph replays the layers as captured and would miss new "
                "codes; set code_update_every=0 and ste_codes=false, or cuda_graphs=false"
            )
        try:
            re.compile(self.lora_targets)
        except re.error as err:
            raise ValueError(f"recovery.lora_targets={self.lora_targets!r} is not a valid regex: {err}") from err

    def to_dict(self) -> dict:
        return asdict(self)
