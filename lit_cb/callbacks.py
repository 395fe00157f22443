"""The compression step as a Lightning callback.

:class:`CompressionCallback` compresses the LightningModule's ``model`` in ``setup("fit")``:
after the process group exists (so Hessians all-reduce across ranks) and before
``configure_model`` adds LoRA and the optimizers are built. Like Lightning's ModelPruning, it
validates its arguments up front, reports on rank zero, and makes its change survive
checkpoints: its state holds the compressed modules' specs, so resuming ``fit`` from a
checkpoint rebuilds the compressed structure and the checkpoint fills in the tensors, with no
recalibration.
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import OnExceptionCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from lit_cb.compress import CompressionConfig, CompressionReport, bits_per_weight, compress_model
from lit_cb.fingerprint import check_same, compression_scope
from lit_cb.integrity import load_checkpoint
from lit_cb.serialization import build_module, compressed_specs


class CompressionCallback(L.Callback):
    """Compress ``pl_module.model`` with calibration windows from the datamodule.

    Args:
        config: what to compress and how (validated here, before any work).
        resume_dir: where finished blocks are written; an interrupted run resumes from there.
        eval_fn: optional ``fn(model) -> float`` called right after compression (perplexity of the
            compressed model before recovery); its result lands in ``metrics["compressed_ppl"]``.
        ckpt_path: the Lightning checkpoint that ``trainer.fit(ckpt_path=...)`` will resume from.
            Lightning sets ``trainer.ckpt_path`` only after the ``setup`` hook, so the callback is
            told here; with it, the compressed structure is rebuilt from the checkpoint's specs and
            calibration is skipped (the weights then come from the checkpoint).
        fingerprint: the run's :func:`lit_cb.fingerprint.run_fingerprint`; stored in the checkpoint
            state and with the finished blocks, and compared with theirs before either is resumed.
    """

    def __init__(
        self,
        config: CompressionConfig,
        resume_dir: str | Path | None = None,
        eval_fn=None,
        ckpt_path: str | Path | None = None,
        fingerprint: dict | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(config, CompressionConfig):
            raise TypeError(f"config must be a CompressionConfig, got {type(config).__name__}")
        self.config = config
        self.resume_dir = Path(resume_dir) if resume_dir else None
        self.eval_fn = eval_fn
        self.ckpt_path = str(ckpt_path) if ckpt_path else None
        self.fingerprint = fingerprint
        # Wall time of this process's setup (compression or rebuild); not checkpointed, unlike metrics.
        self.setup_seconds = 0.0
        self.report: CompressionReport | None = None
        self.specs: dict[str, dict] = {}
        self.metrics: dict[str, float | dict | None] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.specs:
            return
        model = pl_module.model
        t_setup = time.perf_counter()
        ckpt_path = self.ckpt_path or trainer.ckpt_path
        if ckpt_path:
            self._rebuild_from_checkpoint(ckpt_path, model)
            self.setup_seconds = time.perf_counter() - t_setup
            return
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "calibration_windows"):
            raise ValueError(
                "CompressionCallback needs a datamodule with calibration_windows() (CompressionDataModule)"
            )
        windows = dm.calibration_windows(rank=trainer.global_rank, world_size=trainer.world_size)
        device = trainer.strategy.root_device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        self.report = compress_model(
            model,
            windows,
            self.config,
            device=device,
            resume_dir=self.resume_dir,
            progress=trainer.is_global_zero,
            fingerprint=compression_scope(self.fingerprint) if self.fingerprint else None,
        )
        self.specs = compressed_specs(model)
        self.metrics["compress_seconds"] = time.perf_counter() - t0
        # compress_model resets the CUDA peak counter per stage and reports the max over stages.
        self.metrics["compress_peak_gpu_gb"] = self.report.peak_gpu_gb
        self.metrics["bits_per_weight"] = bits_per_weight(model)
        bpw = self.metrics["bits_per_weight"]
        rank_zero_info(
            f"compressed {len(self.specs)} linears with {self.config.method} "
            f"in {self.metrics['compress_seconds']:.1f}s: "
            f"{bpw['compressed_linears']:.3f} bits/weight over them, {bpw['whole_model']:.3f} over the model"
        )
        if self.eval_fn is not None:
            model.to(device)
            self.metrics["compressed_ppl"] = float(self.eval_fn(model))
            rank_zero_info(f"perplexity after compression: {self.metrics['compressed_ppl']:.3f}")
        self.setup_seconds = time.perf_counter() - t_setup

    def _rebuild_from_checkpoint(self, ckpt_path: str, model: torch.nn.Module) -> None:
        ckpt = load_checkpoint(ckpt_path)  # weights_only=True: no pickle
        state = ckpt.get("callbacks", {}).get(self.state_key)
        if not state or not state.get("specs"):
            raise ValueError(f"{ckpt_path} holds no CompressionCallback state: it was not written by a lit_cb run")
        check_same(
            state.get("fingerprint"),
            self.fingerprint,
            f"the checkpoint {ckpt_path}",
            "Start fresh with another run_name or output_dir, or with overwrite=true (the old run folder is "
            "moved aside, not deleted).",
        )
        for name, spec in state["specs"].items():
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, build_module(spec))
        self.specs = state["specs"]
        self.metrics = state.get("metrics", {})
        rank_zero_info(f"rebuilt {len(self.specs)} compressed linears from {ckpt_path}; calibration skipped")

    def state_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "specs": self.specs,
            "metrics": self.metrics,
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.specs = state_dict.get("specs", self.specs)
        self.metrics = state_dict.get("metrics", self.metrics)


class CrashCheckpoint(OnExceptionCheckpoint):
    """Write ``last.ckpt`` when recovery training stops on an exception (a bug, an OOM, Ctrl-C,
    SIGTERM), so a crash loses nothing since the last periodic checkpoint.

    Saved only at a point a resume can continue from exactly: after at least one optimizer step
    (a failure inside compression is resumed from the finished blocks instead), and not in the
    middle of a gradient accumulation (its partial gradients are not in a checkpoint; the
    periodic ``last.ckpt`` is kept then). The RNG is stored as the failed step found it.

    A SIGTERM in an epoch's last step stops training after the epoch has ended (Lightning raises
    it at the end of ``FitLoop.on_advance_end``), before the next epoch resets the training
    loop's per-epoch counters. Saved as they are, a resume would start the next epoch as if its
    batches were already trained (it ends after one batch) and the loader would skip an epoch; so
    they are saved as the next epoch will find them (see :func:`_between_epochs`).
    """

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        if trainer.global_step == 0 or progress.processed % trainer.accumulate_grad_batches:
            return
        mid_step = progress.started > progress.processed
        if mid_step and getattr(pl_module, "_rng_at_batch_start", None) is not None:
            pl_module._rng_for_checkpoint = pl_module._rng_at_batch_start
        try:
            with _between_epochs(trainer):
                super().on_exception(trainer, pl_module, exception)
            rank_zero_info(f"training stopped ({type(exception).__name__}); state saved to {self.ckpt_path}")
        finally:
            pl_module._rng_for_checkpoint = None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning's version deletes the file at the end of fit: here it is last.ckpt, shared with
        # the periodic ModelCheckpoint, and must stay.
        pass


@contextmanager
def _between_epochs(trainer: L.Trainer):
    """While the fit loop stands between two epochs (the last one completed, the next not yet
    started), give the training epoch loop the per-epoch counters the next epoch starts with
    (``reset_on_run``, what Lightning does when that epoch starts), and put them back afterwards.

    Lightning's restore cannot tell this state from a mid-epoch one: it keeps the finished
    epoch's batch count, so the resumed epoch would end after one batch. The resumable loader's
    state (:class:`lit_cb.data.datamodule.ResumableLoader`) is read from the same counters and so
    names the next epoch from its first batch."""
    epochs = trainer.fit_loop.epoch_progress.current
    if not (epochs.started > 0 and epochs.completed == epochs.started):
        yield
        return
    loop = trainer.fit_loop.epoch_loop
    counters = (loop.batch_progress, loop.scheduler_progress, loop.automatic_optimization.optim_progress)
    saved = [copy.deepcopy(c.state_dict()) for c in counters]
    for c in counters:
        c.reset_on_run()
    try:
        yield
    finally:
        for c, state in zip(counters, saved, strict=True):
            c.load_state_dict(state)
