"""Recovery fine-tuning: a LightningModule that trains what compression left trainable.

Codes stay frozen unless ``code_update_every > 0`` (then :class:`lit_cb.code_update_callback.
CodeUpdateCallback` re-assigns them every that many steps). What trains is chosen by
:class:`RecoveryConfig`: LoRA adapters (peft) on the
dense linears that remain, optionally LoRA on compressed linears too (through a small peft
dispatcher, :class:`lit_cb.lora.CodebookLoraLinear`), and optionally the codebooks, scales and norms
themselves (AQLM's end-to-end tuning). The loss is causal-LM cross-entropy, optionally mixed
with KL distillation from the float teacher's logits.
"""

from __future__ import annotations

import math
import re
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from peft import LoraConfig, get_peft_model
from torch import nn
from torchmetrics.text import Perplexity

from lit_cb.architectures import DEFAULT_LORA_TARGETS, spec_for  # noqa: F401 (re-exported)
from lit_cb.code_update_callback import CodeUpdateCallback
from lit_cb.configs.recovery import RecoveryConfig  # noqa: F401 (re-exported: the config lives torch-free)
from lit_cb.distillation import kl_to_teacher, next_token_cross_entropy
from lit_cb.evaluate import causal_lm_perplexity_update
from lit_cb.layers import CodebookLinear, CompressedLinear
from lit_cb.lora import CodebookLoraLinear, register_dispatcher  # noqa: F401 (re-exported)
from lit_cb.step_graphs import StepGraphs


def lora_target_names(model: nn.Module, config: RecoveryConfig) -> list[str]:
    """Full names of the linears LoRA wraps; the default ``lora_targets`` means every linear of
    the model family's blocks (:mod:`lit_cb.architectures`)."""
    pattern = config.lora_targets
    if pattern == DEFAULT_LORA_TARGETS:
        pattern = spec_for(model).lora_target_regex(pattern)
    regex = re.compile(pattern)
    names = []
    for name, m in model.named_modules():
        if not regex.search(name):
            continue
        if isinstance(m, nn.Linear) or (config.lora_on_compressed and isinstance(m, CompressedLinear)):
            names.append(name)
    return names


def apply_lora(model: nn.Module, config: RecoveryConfig) -> nn.Module:
    """Wrap ``model`` with peft LoRA on the selected linears (returns the peft model)."""
    targets = lora_target_names(model, config)
    if not targets:
        raise ValueError(
            "recovery: LoRA selected no layer: every target linear is compressed. Set "
            "compression.keep_dense > 0, recovery.lora_on_compressed=true, or recovery.lora_r=0 with "
            "recovery.train_codebooks=true"
        )
    lora_cfg = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        bias="none",
    )
    register_dispatcher(lora_cfg)
    with warnings.catch_warnings():
        # peft warns about any base layer it does not know; CodebookLinear is handled by the dispatcher above.
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        return get_peft_model(model, lora_cfg)


def _kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) at temperature T, scaled by T² (chunked over
    tokens, see :mod:`lit_cb.distillation`)."""
    return kl_to_teacher(student_logits, teacher_logits, temperature)


def _rng_states() -> dict:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


class RecoveryModule(L.LightningModule):
    """LoRA / codebook recovery of a compressed causal LM.

    ``teacher`` (optional) is the float model for distillation; it is kept out of the module's
    state (not checkpointed) and moved to the training device at fit start.
    """

    def __init__(self, model: nn.Module, config: RecoveryConfig, teacher: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self._teacher = [teacher] if teacher is not None else []
        if config.distill_alpha > 0 and teacher is None:
            raise ValueError("recovery.distill_alpha > 0 needs a teacher model")
        self.val_ppl = Perplexity()
        self._lora_applied = False
        # RNG states for checkpoints: set by CrashCheckpoint to the state at the failed step's start.
        self._rng_for_checkpoint: dict | None = None
        self._rng_at_batch_start: dict | None = None
        # recovery.cuda_graphs: made at train start (after LoRA and the trainable set are final)
        self.step_graphs: StepGraphs | None = None
        self.save_hyperparameters({"recovery": config.to_dict()})

    def configure_model(self) -> None:
        """Add adapters and choose trainable parameters (after compression, before optimizers)."""
        if self._lora_applied:
            return
        if self.config.max_steps == 0:  # compression only (lit_cb compress): nothing trains, add nothing
            self._lora_applied = True
            return
        for p in self.model.parameters():
            p.requires_grad_(False)
        if self.config.lora_r > 0:
            self.model = apply_lora(self.model, self.config)
        self._lora_applied = True
        for name, m in self.model.named_modules():
            if self.config.train_codebooks and isinstance(m, CompressedLinear):
                # Train in float32: fp16 storage would swallow Adam's small updates.
                m.float()
                for pname in m.quant_parameter_names:  # codebooks and scales; a trellis's scales
                    getattr(m, pname).requires_grad_(True)
            if self.config.ste_codes and isinstance(m, CompressedLinear):
                if not isinstance(m, CodebookLinear):
                    raise ValueError(
                        f"recovery.ste_codes=true: {name} is a {type(m).__name__}, whose codes have no nearest-"
                        "codeword assignment; straight-through code training needs CodebookLinear layers"
                    )
                m.float()
                m.start_latent_training()
            if self.config.train_norms and "norm" in name.rsplit(".", 1)[-1] and hasattr(m, "weight"):
                m.weight.requires_grad_(True)
        if self.config.train_embeddings:
            for p in self._embedding_params():
                p.requires_grad_(True)
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError("recovery: nothing is trainable (lora_r=0 and train_codebooks/train_norms off)")
        self._ignore_codes_in_ddp()
        self.model.train()

    def _embedding_params(self) -> list[nn.Parameter]:
        """The input embedding's and the output head's weights (one tensor when tied)."""
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        params: list[nn.Parameter] = []
        for module in (base.get_input_embeddings(), base.get_output_embeddings()):
            if module is not None and all(module.weight is not p for p in params):
                params.append(module.weight)
        return params

    def configure_callbacks(self) -> list[L.Callback]:
        """Discrete code updates (PV-tuning's V-step) when ``code_update_every > 0``."""
        if self.config.code_update_every > 0 and self.config.max_steps > 0:
            return [CodeUpdateCallback.from_config(self.config)]
        return []

    def _ignore_codes_in_ddp(self) -> None:
        """Keep CodebookLinear codes out of DDP's buffer sync.

        DDP broadcasts every buffer from rank 0 when it wraps the module and again before every
        forward. Codes are identical on all ranks by construction (compression broadcasts them, a
        checkpoint restores them alike, code updates broadcast rank 0's new codes: see
        :mod:`lit_cb.code_update_callback`), so that traffic is pure waste: the
        codes of a 7B model are about 1.6 GB per forward. gloo cannot even carry int16 (the codes
        of 9..16-bit codebooks), so without this a CPU DDP run with them fails at wrap time.
        (FSDP does not shard buffers, so codes stay whole there too; Lightning's FSDPStrategy
        needs CUDA, and CodebookLinear's mix of frozen and trainable parameters needs
        ``use_orig_params=True``.)"""
        from torch.nn.parallel import DistributedDataParallel

        names = [f"{name}.codes" for name, m in self.named_modules() if isinstance(m, CompressedLinear)]
        if names:
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, names)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The RNG streams (dropout) as they are after this step, so that a resumed run draws the
        # same numbers as the uninterrupted one.
        checkpoint["rng_states"] = self._rng_for_checkpoint or _rng_states()

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # A crash checkpoint taken inside this step must store the RNG as the step found it.
        self._rng_at_batch_start = _rng_states()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._rng_to_restore = checkpoint.get("rng_states")

    def on_train_start(self) -> None:
        # Restored here, not at load time: building LoRA and the loaders after the load draws
        # numbers that the uninterrupted run drew before its checkpoint.
        rng = getattr(self, "_rng_to_restore", None)
        if rng:
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
            self._rng_to_restore = None
        if self.config.cuda_graphs and self.step_graphs is None:
            if self.device.type != "cuda":
                raise ValueError(f"recovery.cuda_graphs=true needs a GPU; this run trains on {self.device}")
            self.step_graphs = StepGraphs(self.model, self._teacher[0] if self._teacher else None, log=rank_zero_info)

    def on_fit_start(self) -> None:
        for t in self._teacher:
            t.to(self.device).eval()
            for p in t.parameters():
                p.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.step_graphs is not None:
            return self.step_graphs.student_logits(input_ids)
        return self.model(input_ids=input_ids, use_cache=False).logits

    @property
    def distills(self) -> bool:
        """Whether the loss has a KL term (needs the teacher's logits)."""
        return self.config.distill_alpha > 0

    @torch.no_grad()
    def teacher_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """The float teacher's logits of a batch of token ids (no gradient)."""
        if self.step_graphs is not None:
            return self.step_graphs.teacher_logits(ids)
        return self._teacher[0](input_ids=ids, use_cache=False).logits

    def loss_terms(self, ids: torch.Tensor, teacher_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The training loss of a batch of token ids and its parts (``loss``, ``ce``, ``kl`` when
        distilling): one definition for the training step and for the code-update guard
        (:class:`~lit_cb.code_update_callback.CodeUpdateCallback`), which compares it before and
        after re-assigning codes. ``teacher_logits``: the teacher's logits of ``ids`` computed
        earlier (the guard evaluates one batch several times; the teacher does not change)."""
        logits = self(ids)
        if self.config.distill_alpha == 1.0:  # pure KL: cross-entropy only for the log, without a graph
            ce = next_token_cross_entropy(logits, ids)
        else:
            ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        terms = {"loss": ce, "ce": ce}
        if self.distills:
            if teacher_logits is None:
                teacher_logits = self.teacher_logits(ids)
            kl = _kl_to_teacher(logits, teacher_logits, self.config.distill_temperature)
            terms["kl"] = kl
            terms["loss"] = (1 - self.config.distill_alpha) * ce + self.config.distill_alpha * kl
        return terms

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        terms = self.loss_terms(batch["input_ids"])
        if "kl" in terms:
            self.log("train_kl", terms["kl"], prog_bar=True)
        self.log("train_ce", terms["ce"], prog_bar=True)
        self.log("train_loss", terms["loss"])
        return terms["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        ids = batch["input_ids"]
        causal_lm_perplexity_update(self.val_ppl, self(ids), ids)

    def on_validation_epoch_end(self) -> None:
        self.log("val_ppl", self.val_ppl.compute(), prog_bar=True, sync_dist=True)
        self.val_ppl.reset()

    def configure_optimizers(self):
        if self.config.max_steps == 0:
            return None
        embeddings = {id(p) for p in self._embedding_params()} if self.config.train_embeddings else set()
        by_lr: dict[str, list[nn.Parameter]] = {"lr": [], "codebook_lr": [], "embedding_lr": [], "latent_lr": []}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            if id(p) in embeddings:
                by_lr["embedding_lr"].append(p)
            elif name.endswith("latent"):
                by_lr["latent_lr"].append(p)
            elif name.endswith(("codebooks", "scales")):
                by_lr["codebook_lr"].append(p)
            else:
                by_lr["lr"].append(p)
        # One group per learning rate, in a fixed order (the optimizer state in a checkpoint is by group).
        groups = [{"params": ps, "lr": getattr(self.config, key)} for key, ps in by_lr.items() if ps]
        opt = torch.optim.AdamW(groups, weight_decay=self.config.weight_decay)
        total = max(1, self.config.max_steps)
        warmup = min(self.config.warmup_steps, total)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def merged_model(self) -> nn.Module:
        """The plain transformers model with every LoRA merged: into the weights of dense
        linears, into the low-rank slot of compressed ones (stored at ``recovery.low_rank_bits``)."""
        model = self.model.merge_and_unload() if hasattr(self.model, "merge_and_unload") else self.model
        for m in model.modules():
            if isinstance(m, CompressedLinear):
                if isinstance(m, CodebookLinear):
                    m.finish_latent_training()  # ste_codes: the codes the latent points at, then no latent
                m.half()  # back to the fp16 storage format
                m.round_low_rank(self.config.low_rank_bits)  # 8: what is evaluated next is what is saved
        return model
