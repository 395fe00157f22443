"""A training progress bar that counts optimizer steps out of ``max_steps``.

Recovery is bounded by steps, not epochs (``max_epochs=-1``), so Lightning's bars show a
meaningless ``Epoch 0/-2``. This bar shows ``recovery: 12/30 steps`` and keeps counting across the
epoch boundaries of a small fine-tuning set, and from the checkpoint's step on a resumed run.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """:class:`TQDMProgressBar` whose training bar is ``trainer.global_step / trainer.max_steps``."""

    def __init__(self, description: str = "recovery", refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.description = description

    def _total_steps(self, trainer: L.Trainer) -> int | None:
        return trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        bar = self.train_progress_bar
        if bar.total != self._total_steps(trainer) or bar.n != trainer.global_step:
            bar.reset(total=self._total_steps(trainer))
            bar.n = trainer.global_step
        bar.unit = "step"
        bar.set_description(self.description)
        bar.refresh()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        bar = self.train_progress_bar
        if bar is None or bar.disable:
            return
        if trainer.global_step != bar.n:
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
