"""Held-out validation during recovery: the perplexity curve, early stopping, best-weights restore.

Recovery on a few hundred thousand C4 tokens overfits them eventually, and where the held-out
perplexity turns is not known in advance. :class:`HeldOutEarlyStopping` measures the perplexity of
the held-out C4 windows (documents disjoint from the training ones) every ``val_every_n_steps``
optimizer steps and at the last step, records ``(step, val_ppl, train_loss)`` in
``recovery_curve.json`` (plotted to ``recovery_curve.png``; with ``codes_changed``, the share of
codes, one per group and codebook, that differ from those at the start of training, where the
model has codes: whether code training moves any), stops training when the perplexity has
not improved by ``min_delta`` for ``patience`` evaluations, and at the end of training puts back the
trainable tensors (and the codes, which code-updating recovery may change) of the best evaluation,
so the saved model is the best one. Optionally it also records WikiText-2 perplexity every
``test_every_n_steps`` steps, labelled as a test-set probe: it never decides anything.

It evaluates in ``on_train_batch_end``, after the optimizer step and before the periodic
``ModelCheckpoint`` of the same step (Lightning runs checkpoint callbacks last), and keeps its whole
state (curve, best value and step, patience counter, best tensors and the starting codes on the CPU) in
the checkpoint: a run resumed from any checkpoint continues exactly as the uninterrupted run. Evaluation
runs in eval mode (no dropout) and draws no random numbers, so it does not disturb the training RNG stream.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lit_cb.evaluate import perplexity
from lit_cb.integrity import atomic_write_text

CURVE_JSON = "recovery_curve.json"
CURVE_PNG = "recovery_curve.png"


class HeldOutEarlyStopping(L.Callback):
    """See the module docstring.

    Args:
        every_n_steps: evaluate every N optimizer steps (and at ``max_steps``); >= 1.
        patience: evaluations without improvement before training stops (0: never stop early).
        min_delta: how much lower than the best perplexity counts as an improvement.
        run_dir: where ``recovery_curve.json``/``.png`` go (None: nowhere).
        eval_batch_size: windows per forward.
        test_every_n_steps: also record the WikiText-2 test perplexity every N steps (0: off).
    """

    def __init__(
        self,
        every_n_steps: int,
        patience: int = 0,
        min_delta: float = 0.0,
        run_dir: str | Path | None = None,
        eval_batch_size: int = 1,
        test_every_n_steps: int = 0,
    ) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps} must be >= 1")
        self.every_n_steps = every_n_steps
        self.patience = patience
        self.min_delta = min_delta
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.eval_batch_size = eval_batch_size
        self.test_every_n_steps = test_every_n_steps
        self.curve: list[dict] = []
        self.best_ppl: float | None = None
        self.best_step: int | None = None
        self.wait = 0
        self.last_eval_step = 0
        self.stopped_step: int | None = None
        self.restored_step: int | None = None
        self.best_weights: dict[str, torch.Tensor] = {}
        self.codes_at_start: dict[str, torch.Tensor] = {}
        self.codes_reference_step: int | None = None

    # -- what is kept ---------------------------------------------------------------------------------
    @staticmethod
    def _tracked(pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        """The tensors recovery can change: trainable parameters, and every ``codes`` buffer."""
        tensors = {name: p for name, p in pl_module.named_parameters() if p.requires_grad}
        tensors.update({name: b for name, b in pl_module.named_buffers() if name.rsplit(".", 1)[-1] == "codes"})
        return tensors

    def _snapshot(self, pl_module: L.LightningModule) -> None:
        self.best_weights = {name: t.detach().to("cpu", copy=True) for name, t in self._tracked(pl_module).items()}

    @torch.no_grad()
    def _restore(self, pl_module: L.LightningModule) -> None:
        tracked = self._tracked(pl_module)
        missing = sorted(set(self.best_weights) - set(tracked))
        if missing:
            raise RuntimeError(f"the best weights name tensors the model no longer has: {missing[:5]}")
        for name, value in self.best_weights.items():
            tracked[name].copy_(value)

    @staticmethod
    def _codes(pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        return {name: b for name, b in pl_module.named_buffers() if name.rsplit(".", 1)[-1] == "codes"}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The reference is a copy on the model's device (one byte per 4-8 weights at 2 bits). It is
        # checkpointed (state_dict), so a resumed run keeps counting from the first start, as the
        # uninterrupted run does: the codes in a checkpoint are the ones training has moved already.
        codes = self._codes(pl_module)
        if self.codes_at_start:  # restored by load_state_dict, before this hook
            missing = sorted(set(self.codes_at_start) - set(codes))
            if missing:
                raise RuntimeError(f"the checkpoint's reference codes name buffers the model lacks: {missing[:5]}")
            self.codes_at_start = {name: ref.to(codes[name].device) for name, ref in self.codes_at_start.items()}
            return
        self.codes_at_start = {name: b.detach().clone() for name, b in codes.items()}
        self.codes_reference_step = trainer.global_step

    @torch.no_grad()
    def codes_changed(self, pl_module: L.LightningModule) -> float | None:
        """Share of codes (one per group and codebook) that differ from those at the start of training
        (None: the model has no codes). Codes are one uint8/int16 element each in memory."""
        if not self.codes_at_start:
            return None
        now = self._codes(pl_module)
        changed = sum(int((now[name] != ref).sum()) for name, ref in self.codes_at_start.items() if name in now)
        return changed / sum(ref.numel() for ref in self.codes_at_start.values())

    # -- evaluation -----------------------------------------------------------------------------------
    def _perplexity(self, trainer: L.Trainer, pl_module: L.LightningModule, windows: torch.Tensor) -> float:
        with trainer.precision_plugin.forward_context():
            return perplexity(pl_module.model, windows, self.eval_batch_size, pl_module.device, progress=False)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == 0 or step == self.last_eval_step:
            return  # no optimizer step since the last evaluation (or inside a gradient accumulation)
        at_end = trainer.max_steps is not None and trainer.max_steps > 0 and step >= trainer.max_steps
        if step % self.every_n_steps and not at_end:
            return
        self.last_eval_step = step
        dm = trainer.datamodule
        ppl = self._perplexity(trainer, pl_module, dm._val)
        loss = trainer.callback_metrics.get("train_loss")
        entry = {"step": step, "val_ppl": ppl, "train_loss": None if loss is None else float(loss)}
        logged = {"val_ppl": ppl}
        changed = self.codes_changed(pl_module)
        if changed is not None:
            entry["codes_changed"] = logged["codes_changed"] = changed
        if self.test_every_n_steps and (step % self.test_every_n_steps == 0 or at_end):
            entry["wikitext2_ppl_test_probe"] = self._perplexity(trainer, pl_module, dm.test_windows())
            logged["wikitext2_ppl_test_probe"] = entry["wikitext2_ppl_test_probe"]
        self.curve.append(entry)
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=step)
        if self.best_ppl is None or ppl < self.best_ppl - self.min_delta:
            self.best_ppl, self.best_step, self.wait = ppl, step, 0
            self._snapshot(pl_module)
        else:
            self.wait += 1
            if self.patience and self.wait >= self.patience:
                self.stopped_step = step
                trainer.should_stop = True
                rank_zero_info(
                    f"early stopping at step {step}: held-out perplexity {ppl:.3f} has not improved on "
                    f"{self.best_ppl:.3f} (step {self.best_step}) for {self.wait} evaluations"
                )
        if trainer.is_global_zero:
            self.write_curve()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.best_weights:
            self._restore(pl_module)
            self.restored_step = self.best_step
            rank_zero_info(
                f"restored the weights of step {self.best_step} (held-out perplexity {self.best_ppl:.3f}); "
                f"training ended at step {trainer.global_step}"
            )
        if trainer.is_global_zero:
            self.write_curve(plot=True)

    # -- outputs --------------------------------------------------------------------------------------
    def summary(self) -> dict:
        return {
            "every_n_steps": self.every_n_steps,
            "patience": self.patience,
            "min_delta": self.min_delta,
            "best_step": self.best_step,
            "best_val_ppl": self.best_ppl,
            "stopped_early_at": self.stopped_step,
            "restored_step": self.restored_step,
            "codes_reference_step": self.codes_reference_step,
            "points": self.curve,
        }

    def write_curve(self, plot: bool = False) -> None:
        if self.run_dir is None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / CURVE_JSON, json.dumps(self.summary(), indent=1))
        if plot and self.curve:
            plot_curve(self.summary(), self.run_dir / CURVE_PNG, title=f"recovery of {self.run_dir.name}")

    # -- checkpoint -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "curve": self.curve,
            "best_ppl": self.best_ppl,
            "best_step": self.best_step,
            "wait": self.wait,
            "last_eval_step": self.last_eval_step,
            "stopped_step": self.stopped_step,
            "best_weights": self.best_weights,
            "codes_at_start": {name: t.detach().to("cpu", copy=True) for name, t in self.codes_at_start.items()},
            "codes_reference_step": self.codes_reference_step,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.curve = list(state_dict.get("curve", []))
        self.best_ppl = state_dict.get("best_ppl")
        self.best_step = state_dict.get("best_step")
        self.wait = int(state_dict.get("wait", 0))
        self.last_eval_step = int(state_dict.get("last_eval_step", 0))
        self.stopped_step = state_dict.get("stopped_step")
        self.best_weights = dict(state_dict.get("best_weights", {}))
        self.codes_at_start = dict(state_dict.get("codes_at_start", {}))
        self.codes_reference_step = state_dict.get("codes_reference_step")


def plot_curve(summary: dict, out: Path, title: str = "recovery") -> Path:
    """Held-out perplexity (and the test-set probe, when recorded) and training loss against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = summary["points"]
    steps = [p["step"] for p in points]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [p["val_ppl"] for p in points], "o-", color="tab:red", label="held-out C4 ppl")
    probe = [(p["step"], p["wikitext2_ppl_test_probe"]) for p in points if "wikitext2_ppl_test_probe" in p]
    if probe:
        ax.plot(*zip(*probe, strict=True), "s--", color="tab:purple", label="WikiText-2 ppl (test probe)")
    if summary.get("best_step") is not None:
        ax.axvline(summary["best_step"], color="gray", ls=":", label=f"best (step {summary['best_step']})")
    ax.set_xlabel("step")
    ax.set_ylabel("perplexity")
    handles, labels = ax.get_legend_handles_labels()
    losses = [(p["step"], p["train_loss"]) for p in points if p.get("train_loss") is not None]
    if losses and all(math.isfinite(v) for _, v in losses):
        ax2 = ax.twinx()
        ax2.plot(*zip(*losses, strict=True), "-", color="tab:blue", alpha=0.6, label="train loss")
        ax2.set_ylabel("training loss")
        more = ax2.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.set_title(title)
    ax.legend(handles, labels, loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
