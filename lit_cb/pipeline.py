"""The end-to-end recipe body: float eval -> compress (callback) -> recover (LightningModule) ->
eval -> save. Recipes are thin typed wrappers around :func:`run` with their own YAML."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_cb.callbacks import CompressionCallback
from lit_cb.compress import bits_per_weight
from lit_cb.config import RunConfig, save_config
from lit_cb.data import CompressionDataModule
from lit_cb.evaluate import perplexity
from lit_cb.models import load_model
from lit_cb.progress import StepProgressBar
from lit_cb.recovery import RecoveryModule
from lit_cb.run_summary import format_summary, peak_rss_gb, plot_recovery, stage, timed_eval
from lit_cb.serialization import save_compressed


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


def run(cfg: RunConfig) -> dict:
    """Run the whole pipeline; returns (and writes to ``run_dir/metrics.json``) the metrics."""
    if cfg.model.requires_gpu and not torch.cuda.is_available():
        raise RuntimeError(
            f"recipe {cfg.run_name!r} needs a GPU (model {cfg.model.name}); none is visible. "
            "Use the smollm2 recipes on a CPU machine."
        )
    L.seed_everything(cfg.seed, workers=True)
    if cfg.trainer.deterministic:
        use_deterministic_kernels()
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "run_config.yaml")
    device = _device(cfg)
    metrics: dict = {"run_name": cfg.run_name, "method": cfg.compression.method, "stages": {}}

    stages = metrics["stages"]
    with stage(stages, "load"):
        model, tokenizer = load_model(cfg.model.name, cfg.model.dtype)
        dm = CompressionDataModule(tokenizer, cfg.data)

    ppl = metrics.setdefault("wikitext2_ppl", {})
    if cfg.eval.float_model:
        with stage(stages, "eval_float", device):
            model.to(device)
            ppl["float"] = make_eval_fn(cfg, dm, device, "float ppl")(model)
            model.cpu()
        rank_zero_info(f"float perplexity: {ppl['float']:.3f}")

    teacher = copy.deepcopy(model) if cfg.recovery.distill_alpha > 0 else None
    ckpt_dir = run_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    ckpt_path = str(last) if cfg.resume and last.is_file() else None
    compression = CompressionCallback(
        cfg.compression,
        resume_dir=run_dir / "blocks" if cfg.resume else None,
        eval_fn=timed_eval(make_eval_fn(cfg, dm, device, "compressed ppl"), stages, "eval_compressed", device)
        if cfg.eval.compressed
        else None,
        ckpt_path=ckpt_path,
    )
    module = RecoveryModule(model, cfg.recovery, teacher=teacher)
    # One copy of each state: last.ckpt only (save_top_k=0), overwritten every quarter of the steps.
    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir, save_last=True, save_top_k=0, every_n_train_steps=max(1, cfg.recovery.max_steps // 4)
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
        callbacks=[compression, checkpoint, StepProgressBar("recovery")],
        deterministic="warn" if cfg.trainer.deterministic else None,
        logger=make_loggers(cfg) or False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    t = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    fit_seconds = time.perf_counter() - t
    stages["compress"] = {
        "seconds": compression.metrics.get("compress_seconds"),
        "peak_gpu_gb": compression.metrics.get("compress_peak_gpu_gb"),
    }
    stages["recover"] = {
        # This process's training only: a resumed run does not count the steps before its checkpoint.
        "seconds": fit_seconds - compression.setup_seconds,
        "steps": trainer.global_step,
        "resumed_from": ckpt_path,
        "peak_gpu_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "peak_rss_gb": peak_rss_gb(),
    }
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
            extra={"run_config": cfg.to_dict(), "wikitext2_ppl": ppl},
        )
        if "csv" in cfg.trainer.loggers and cfg.recovery.max_steps > 0:
            plot_recovery(run_dir)
    metrics["peak_rss_gb"] = peak_rss_gb()
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
    print(format_summary(metrics, run_dir), flush=True)
    return metrics
