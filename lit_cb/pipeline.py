"""The end-to-end recipe body: float eval -> compress (callback) -> recover (LightningModule) ->
eval -> save. Recipes are thin typed wrappers around :func:`run` with their own YAML."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_cb.architectures import check_model as check_architecture
from lit_cb.callbacks import CompressionCallback, CrashCheckpoint
from lit_cb.compress import bits_per_weight
from lit_cb.config import RunConfig, save_config
from lit_cb.data import CompressionDataModule
from lit_cb.data.teacher_text import teacher_windows
from lit_cb.early_stop import CURVE_JSON, CURVE_PNG, HeldOutEarlyStopping
from lit_cb.environment import run_environment
from lit_cb.evaluate import perplexity
from lit_cb.fingerprint import check_same, compression_scope, run_fingerprint
from lit_cb.integrity import atomic_write_text, check_blocks_readable, load_checkpoint
from lit_cb.models import EMBEDDED_FAMILIES, load_model
from lit_cb.preflight import check_model, check_text_sources
from lit_cb.progress import StepProgressBar
from lit_cb.recovery import RecoveryModule
from lit_cb.reuse_blocks import copy_blocks, source_blocks
from lit_cb.run_summary import format_summary, peak_rss_gb, plot_recovery, stage, timed_eval
from lit_cb.serialization import bits_per_weight_on_disk, save_compressed
from lit_cb.slurm import SlurmRequeue, check_trainer_matches_slurm, in_slurm_step, latest_checkpoint
from lit_cb.train_lock import TrainLock

FINGERPRINT_FILE = "fingerprint.json"


def _device(cfg: RunConfig) -> torch.device:
    if cfg.trainer.accelerator in ("gpu", "cuda") or (cfg.trainer.accelerator == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.accelerator asks for a GPU but torch sees none")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def make_eval_fn(cfg: RunConfig, dm: CompressionDataModule, device: torch.device, desc: str):
    """``fn(model) -> perplexity`` on the evaluation windows, under the configured autocast."""
    dtype = getattr(torch, cfg.eval.autocast_dtype) if cfg.eval.autocast_dtype else None

    def fn(model) -> float:
        ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with ctx:
            return perplexity(model, dm.test_windows(), cfg.eval.batch_size, device, desc=desc)

    return fn


def use_deterministic_kernels() -> None:
    """Deterministic CUDA kernels from here on (index_add_, index_put_ with accumulate, cuBLAS
    workspaces); ops that have none warn instead of failing. Set before any GPU work, since cuBLAS
    reads its workspace setting when a handle is created."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


def make_loggers(cfg: RunConfig) -> list:
    """The configured Lightning loggers (``trainer.loggers``): CSV in ``<run>/logs``, TensorBoard
    in ``<run>/tensorboard`` (skipped with a warning where no TensorBoard package is installed)."""
    loggers = []
    if "csv" in cfg.trainer.loggers:
        loggers.append(CSVLogger(cfg.run_dir, name="logs"))
    if "tensorboard" in cfg.trainer.loggers:
        try:
            loggers.append(TensorBoardLogger(cfg.run_dir, name="tensorboard", default_hp_metric=False))
        except ModuleNotFoundError:
            # A machine without the package (e.g. an offline GPU box) still runs; the CSV logs remain.
            rank_zero_warn(
                "trainer.loggers lists tensorboard, but neither tensorboard nor tensorboardX is installed "
                "(pip install tensorboardX): no TensorBoard logs for this run"
            )
    return loggers


def _run_dir_state(cfg: RunConfig) -> dict | None:
    """Read-only look at ``run_dir`` before anything is loaded: refuses a non-empty folder that
    resume=false would overwrite, and returns the stored fingerprint of a run to resume (None for
    a fresh run)."""
    run_dir = cfg.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run folder {run_dir} (output_dir/run_name) exists and is not a folder")
    if not run_dir.is_dir() or not any(run_dir.iterdir()) or cfg.overwrite:
        return None
    if not cfg.resume and rank_zero_only.rank != 0:
        return None  # rank 0 decides: it may already have started writing this fresh run's folder
    if not cfg.resume:
        raise ValueError(
            f"run folder {run_dir} already holds a run and resume=false would overwrite it. Resume it with "
            "resume=true, choose another run_name or output_dir, or set overwrite=true to move the old folder "
            f"aside (to {run_dir}.replaced-<time>) and start over."
        )
    path = run_dir / FINGERPRINT_FILE
    if not path.is_file():
        raise ValueError(
            f"run folder {run_dir} holds files but no {FINGERPRINT_FILE}, so what made them is unknown (an older "
            "lit_cb, or another program) and resuming could mix two runs. Choose another run_name or output_dir, "
            "or set overwrite=true to move the old folder aside and start over."
        )
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is corrupt ({err}); use another run_name or overwrite=true") from err


_START_FRESH = (
    "To start fresh: choose another run_name or output_dir, or set overwrite=true (the old run folder is moved "
    "aside, not deleted). To continue this run, use the config, model and data it was made with."
)


def _move_aside(run_dir) -> None:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}")
    run_dir.rename(target)
    rank_zero_info(f"overwrite=true: the previous run folder was moved to {target}")


def run(cfg: RunConfig) -> dict:
    """Run the whole pipeline; returns (and writes to ``run_dir/metrics.json``) the metrics.

    Inside a SLURM step the trainer must match the allocation, and SIGUSR1 requeues the job
    (:mod:`lit_cb.slurm`); a requeued process returns ``{"requeued": True, ...}`` unfinished.

    Everything that can be checked is checked before anything in ``run_dir`` is written: the run
    folder's state, the text files, the model's family, layers and weights against the compression
    config, and the fingerprints of saved progress (see :mod:`lit_cb.fingerprint`)."""
    check_trainer_matches_slurm(cfg.trainer.devices, cfg.trainer.num_nodes)
    # Installed first, so a signal during loading or compression requeues instead of killing the task.
    requeue = SlurmRequeue() if in_slurm_step() else None
    try:
        return _run(cfg, requeue)
    finally:
        if requeue is not None:
            requeue.close()


def _run(cfg: RunConfig, requeue: SlurmRequeue | None) -> dict:
    if cfg.model.requires_gpu and not torch.cuda.is_available():
        raise RuntimeError(
            f"recipe {cfg.run_name!r} needs a GPU (model {cfg.model.name}); none is visible. "
            "Use the smollm2 recipes on a CPU machine."
        )
    # Refuse an unsupported architecture from its config.json alone, before loading the weights.
    check_architecture(cfg.model.name, cfg.model.architecture, EMBEDDED_FAMILIES, cfg.data.calibration_seqlen)
    stored_fingerprint = _run_dir_state(cfg)
    check_text_sources(cfg.data)
    L.seed_everything(cfg.seed, workers=True)
    if cfg.trainer.deterministic:
        use_deterministic_kernels()
    run_dir = cfg.run_dir
    train_lock = TrainLock(cfg.trainer.train_lock, run_dir) if cfg.trainer.train_lock else None  # checks the path
    device = _device(cfg)
    if cfg.recovery.cuda_graphs and cfg.recovery.max_steps and device.type != "cuda":
        raise ValueError(
            f"recovery.cuda_graphs=true needs a GPU, but this run computes on {device} (trainer.accelerator="
            f"{cfg.trainer.accelerator!r}, torch.cuda.is_available()={torch.cuda.is_available()})"
        )
    metrics: dict = {
        "run_name": cfg.run_name,
        "method": cfg.compression.method,
        "environment": run_environment(device),  # the figures below were made here
        "stages": {},
    }

    stages = metrics["stages"]
    with stage(stages, "load"):
        model, tokenizer = load_model(cfg.model.name, cfg.model.dtype)
        check_model(model, cfg.compression)
        dm = CompressionDataModule(tokenizer, cfg.data)
        # Build every window now: too few tokens fails here, not after compression.
        dm.calibration_windows()
        dm.setup("fit")
        dm.test_windows()

    fingerprint = run_fingerprint(cfg, model)
    check_same(stored_fingerprint, fingerprint, f"the run in {run_dir}", _START_FRESH)
    ckpt_dir = run_dir / "checkpoints"
    # last.ckpt, or the HPC checkpoint a SLURM requeue saved after it.
    latest = latest_checkpoint(run_dir) if stored_fingerprint is not None else None
    ckpt_path = str(latest) if latest is not None else None
    if latest is not None:
        state = load_checkpoint(latest).get("callbacks", {}).get("CompressionCallback", {})
        check_same(state.get("fingerprint"), fingerprint, f"the checkpoint {latest}", _START_FRESH)
    progress = run_dir / "blocks" / "progress.json"
    if stored_fingerprint is not None and progress.is_file():
        try:
            blocks = json.loads(progress.read_text())
        except ValueError as err:
            raise ValueError(f"{progress} is corrupt ({err}); move {progress.parent} away to compress again") from err
        check_blocks_readable(progress.parent, blocks.get("blocks", {}))
        stored_blocks = blocks.get("fingerprint")
        check_same(
            stored_blocks, compression_scope(fingerprint), f"the finished blocks in {progress.parent}", _START_FRESH
        )

    copied_blocks = source_blocks(cfg, stored_fingerprint, fingerprint)  # compression.blocks_from, checked

    if stored_fingerprint is not None:
        before, now = stored_fingerprint.get("config", {}).get("recovery.max_steps"), cfg.recovery.max_steps
        if before is not None and before != now:
            rank_zero_warn(
                f"recovery.max_steps changed from {before} to {now} on resume: training continues from the "
                f"checkpoint, but the cosine schedule now spans {now} steps, so the result differs from a run "
                f"planned with {now} steps from the start"
            )

    # Validation passed: from here on the run folder is written (by one process).
    if rank_zero_only.rank == 0:
        if cfg.overwrite and run_dir.is_dir() and any(run_dir.iterdir()):
            _move_aside(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "run_config.yaml")
        atomic_write_text(run_dir / FINGERPRINT_FILE, json.dumps(fingerprint, indent=1))
    if copied_blocks is not None:
        copy_blocks(copied_blocks, run_dir, writer=rank_zero_only.rank == 0)
        rank_zero_info(f"compression.blocks_from: started from the finished blocks of {copied_blocks}")

    ppl = metrics.setdefault("wikitext2_ppl", {})
    if cfg.eval.float_model:
        with stage(stages, "eval_float", device):
            model.to(device)
            ppl["float"] = make_eval_fn(cfg, dm, device, "float ppl")(model)
            model.cpu()
        rank_zero_info(f"float perplexity: {ppl['float']:.3f}")

    if cfg.data.num_teacher_samples > 0 and cfg.recovery.max_steps > 0:
        # Sampled from the float model before compression touches it; cached in the run folder.
        with stage(stages, "teacher_text", device):
            dtype = (
                getattr(torch, cfg.eval.autocast_dtype) if cfg.eval.autocast_dtype and device.type == "cuda" else None
            )
            windows = teacher_windows(
                model, dm, fingerprint["model"], device, run_dir, dtype, write=rank_zero_only.rank == 0
            )
        dm.add_finetune_windows(windows)
        rank_zero_info(
            f"teacher text: {windows.shape[0]} windows added to the {dm._train.shape[0] - windows.shape[0]} C4 ones"
        )

    teacher = copy.deepcopy(model) if cfg.recovery.distill_alpha > 0 else None
    compression = CompressionCallback(
        cfg.compression,
        resume_dir=run_dir / "blocks",
        eval_fn=timed_eval(make_eval_fn(cfg, dm, device, "compressed ppl"), stages, "eval_compressed", device)
        if cfg.eval.compressed
        else None,
        ckpt_path=ckpt_path,
        fingerprint=fingerprint,
    )
    module = RecoveryModule(model, cfg.recovery, teacher=teacher)
    # One copy of each state: last.ckpt only (save_top_k=0), overwritten every quarter of the steps.
    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir, save_last=True, save_top_k=0, every_n_train_steps=max(1, cfg.recovery.max_steps // 4)
    )
    held_out = (
        HeldOutEarlyStopping(
            cfg.recovery.val_every_n_steps,
            cfg.recovery.early_stop_patience,
            cfg.recovery.early_stop_min_delta,
            run_dir,
            cfg.data.eval_batch_size,
            cfg.recovery.test_probe_every_n_steps,
        )
        if cfg.recovery.val_every_n_steps > 0 and cfg.recovery.max_steps > 0
        else None
    )
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        strategy=cfg.trainer.strategy,
        precision=cfg.trainer.precision,
        max_steps=cfg.recovery.max_steps,
        val_check_interval=cfg.trainer.val_check_interval or max(1, cfg.recovery.max_steps),
        check_val_every_n_epoch=None,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        accumulate_grad_batches=cfg.trainer.accumulate_grad_batches,
        gradient_clip_val=cfg.recovery.grad_clip or None,
        # The train lock first: its setup refuses a several-process run before compression's setup compresses.
        callbacks=([train_lock] if train_lock is not None else [])
        + [compression, checkpoint, CrashCheckpoint(ckpt_dir, filename="last"), StepProgressBar("recovery")]
        + ([held_out] if held_out is not None else [])
        + ([requeue] if requeue is not None else []),
        # HeldOutEarlyStopping measures the held-out perplexity itself (after the optimizer step, before the
        # checkpoint of that step); Lightning's validation loop would only repeat it.
        limit_val_batches=0 if held_out is not None else None,
        default_root_dir=run_dir,  # where Lightning writes (and finds) HPC checkpoints
        deterministic="warn" if cfg.trainer.deterministic else None,
        logger=make_loggers(cfg) or False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        # The datamodule's resumable sampler shards by rank itself (see EpochShuffleSampler).
        use_distributed_sampler=False,
    )
    t = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException as err:
        if err.code is not None:
            raise
        # Lightning stops on SIGTERM with a bare SystemExit, i.e. exit status 0: a scheduler would
        # take the stopped run for a finished one. 143 (128 + SIGTERM) is what a killed process
        # reports, and what a SIGTERM during compression (before Lightning's handler) gives.
        rank_zero_info(f"stopped by SIGTERM; rerun the same command to resume from {cfg.run_dir / 'checkpoints'}")
        raise SIGTERMException(128 + signal.SIGTERM) from err
    fit_seconds = time.perf_counter() - t
    if requeue is not None and requeue.requeued:
        # SLURM is ending this job and will start it again; the next run resumes from the checkpoint.
        metrics["requeued"] = True
        return metrics
    stages["compress"] = {
        "seconds": compression.metrics.get("compress_seconds"),
        "peak_gpu_gb": compression.metrics.get("compress_peak_gpu_gb"),
    }
    stages["recover"] = {
        # This process's training only: a resumed run does not count the steps before its checkpoint.
        "seconds": fit_seconds - compression.setup_seconds - (train_lock.waited_s if train_lock else 0.0),
        "steps": trainer.global_step,
        "resumed_from": ckpt_path,
        "peak_gpu_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "peak_rss_gb": peak_rss_gb(),
    }
    if train_lock is not None:
        stages["recover"]["waited_for_train_lock_s"] = train_lock.waited_s
    if module.step_graphs is not None:
        stages["recover"]["cuda_graphs"] = module.step_graphs.status.to_dict()
    if held_out is not None:
        metrics["recovery_curve"] = {
            k: v for k, v in held_out.summary().items() if k in ("best_step", "best_val_ppl", "stopped_early_at")
        }
        metrics["recovery_curve"]["files"] = [str(run_dir / CURVE_JSON), str(run_dir / CURVE_PNG)]
    metrics["bits_per_weight"] = compression.metrics.get("bits_per_weight")
    if compression.report is not None:
        metrics["compression_report"] = compression.report.to_dict()
    if "compressed_ppl" in compression.metrics:
        ppl["compressed"] = compression.metrics["compressed_ppl"]
    if not trainer.is_global_zero:
        return metrics

    final = module.merged_model()
    # Merged LoRA adds low-rank slots to compressed linears: count them in the recovered model's bits.
    metrics["bits_per_weight_recovered"] = bits_per_weight(final)
    if cfg.eval.recovered and cfg.recovery.max_steps > 0:
        with stage(stages, "eval_recovered", device):
            final.to(device)
            ppl["recovered"] = make_eval_fn(cfg, dm, device, "recovered ppl")(final)
        rank_zero_info(f"perplexity after recovery: {ppl['recovered']:.3f}")
    with stage(stages, "save"):
        save_compressed(
            final.cpu(),
            run_dir / "model",
            tokenizer,
            extra={"run_config": cfg.to_dict(), "wikitext2_ppl": ppl, "fingerprint": fingerprint},
        )
        if "csv" in cfg.trainer.loggers and cfg.recovery.max_steps > 0:
            plot_recovery(run_dir)
    # Measured from the tensors model/ holds (the recovered model's), next to the nominal counts above.
    metrics["bits_per_weight_on_disk"] = bits_per_weight_on_disk(run_dir / "model")
    metrics["peak_rss_gb"] = peak_rss_gb()
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
    print(format_summary(metrics, run_dir), flush=True)
    return metrics
