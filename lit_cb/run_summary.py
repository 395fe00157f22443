"""What a finished run tells its user: per-stage time and peak memory, the perplexities and
bits/weight, where every output went, and a PNG of the recovery curves.

Kept apart from :mod:`lit_cb.pipeline` so the pipeline only records numbers; this module turns the
``metrics`` dict (also written to ``metrics.json``) into the printed summary.
"""

from __future__ import annotations

import contextlib
import csv
import resource
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

STAGE_ORDER = ("load", "eval_float", "teacher_text", "compress", "eval_compressed", "recover", "eval_recovered", "save")


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _cuda_peak_gb(device) -> float | None:
    if getattr(device, "type", None) != "cuda":
        return None
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30


@contextlib.contextmanager
def stage(stages: dict, name: str, device=None) -> Iterator[dict]:
    """Record ``seconds``, ``peak_gpu_gb`` (this stage's, on CUDA) and ``peak_rss_gb`` (the
    process's so far) of the block under ``stages[name]``."""
    if getattr(device, "type", None) == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(device)
    record: dict[str, Any] = {}
    t = time.perf_counter()
    try:
        yield record
    finally:
        record.setdefault("seconds", time.perf_counter() - t)
        record.setdefault("peak_gpu_gb", _cuda_peak_gb(device))
        record.setdefault("peak_rss_gb", peak_rss_gb())
        stages[name] = record


def timed_eval(fn: Callable, stages: dict, name: str, device=None) -> Callable:
    """``fn`` wrapped so that each call is recorded as stage ``name`` (the compressed-model
    evaluation runs inside the compression callback, where the pipeline cannot time it)."""

    def wrapped(model):
        with stage(stages, name, device):
            return fn(model)

    return wrapped


def output_paths(run_dir: Path) -> dict[str, str]:
    """The run folder's outputs that exist, by what they are."""
    candidates = {
        "model": run_dir / "model",
        "metrics": run_dir / "metrics.json",
        "config": run_dir / "run_config.yaml",
        "csv logs": run_dir / "logs",
        "tensorboard": run_dir / "tensorboard",
        "recovery plot": run_dir / "recovery.png",
        "recovery curve": run_dir / "recovery_curve.json",
        "recovery curve plot": run_dir / "recovery_curve.png",
        "teacher text": run_dir / "teacher_text",
        "teacher text record": run_dir / "teacher_text.json",
        "checkpoint": run_dir / "checkpoints" / "last.ckpt",
        "compressed blocks": run_dir / "blocks",
    }
    return {k: str(p) for k, p in candidates.items() if p.exists()}


def read_csv_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` from every CSV log of the run (resumed runs add versions)."""
    series: dict[str, dict[int, float]] = {}
    for path in sorted(run_dir.glob("logs/version_*/metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                step = row.get("step")
                for key, value in row.items():
                    if key in ("step", "epoch") or value in ("", None) or step in ("", None):
                        continue
                    series.setdefault(key, {})[int(step)] = float(value)
    return {k: sorted(v.items()) for k, v in series.items()}


def plot_recovery(run_dir: Path, out: Path | None = None) -> Path | None:
    """``recovery.png``: training loss and validation perplexity against steps (None when nothing was logged)."""
    series = read_csv_metrics(run_dir)
    loss, ppl = series.get("train_loss"), series.get("val_ppl")
    if not loss and not ppl:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if loss:
        ax.plot(*zip(*loss, strict=True), label="train loss", color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    if ppl:
        ax2 = ax.twinx()
        ax2.plot(*zip(*ppl, strict=True), "o-", label="validation ppl", color="tab:red")
        ax2.set_ylabel("validation perplexity")
    ax.set_title(f"recovery of {run_dir.name}")
    fig.legend(loc="upper right")
    fig.tight_layout()
    out = out or run_dir / "recovery.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _fmt_gb(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def format_summary(metrics: dict, run_dir: Path | None = None) -> str:
    """The summary printed at the end of a run (from ``metrics.json``'s dict)."""
    ppl = metrics.get("wikitext2_ppl", {})
    bpw = metrics.get("bits_per_weight") or {}
    lines = [f"== {metrics['run_name']} ({metrics['method']}) =="]
    for key in ("float", "compressed", "recovered"):
        if key in ppl:
            lines.append(f"  WikiText-2 perplexity, {key:>10}: {ppl[key]:.3f}")
    if bpw:
        lines.append(
            f"  bits/weight (nominal): {bpw['compressed_linears']:.3f} over compressed linears, "
            f"{bpw['whole_model']:.3f} over the whole model"
        )
    curve = metrics.get("recovery_curve")
    if curve and curve.get("best_step") is not None:
        stopped = f", stopped early at step {curve['stopped_early_at']}" if curve.get("stopped_early_at") else ""
        lines.append(
            f"  best held-out C4 perplexity {curve['best_val_ppl']:.3f} at step {curve['best_step']} "
            f"(its weights were kept{stopped})"
        )
    rec = metrics.get("bits_per_weight_recovered")
    if rec and "recovered" in ppl:
        lines.append(f"  bits/weight after recovery (merged adapters): {rec['compressed_linears']:.3f}")
    disk = metrics.get("bits_per_weight_on_disk")
    if disk:
        lines.append(
            f"  bits/weight on disk (measured from model/'s tensors): {disk['compressed_linears']:.3f} over "
            f"compressed linears, {disk['whole_model']:.3f} over the whole model"
        )
    stages = metrics.get("stages", {})
    if stages:
        lines.append(f"  {'stage':<16}{'seconds':>9}{'peak GPU GB':>13}{'peak RSS GB':>13}")
        names = [s for s in STAGE_ORDER if s in stages] + [s for s in stages if s not in STAGE_ORDER]
        total = 0.0
        for name in names:
            s = stages[name]
            seconds = s.get("seconds")
            total += seconds or 0.0
            extra = f"  ({s['steps']} steps)" if s.get("steps") is not None else ""
            if s.get("resumed_from"):
                extra += " resumed"
            sec = "" if seconds is None else f"{seconds:.1f}"
            lines.append(
                f"  {name:<16}{sec:>9}{_fmt_gb(s.get('peak_gpu_gb')):>13}{_fmt_gb(s.get('peak_rss_gb')):>13}{extra}"
            )
        lines.append(f"  {'total':<16}{total:>9.1f}")
    if run_dir is not None:
        lines.append("  outputs:")
        for what, path in output_paths(Path(run_dir)).items():
            lines.append(f"    {what + ':':<19}{path}")
    return "\n".join(lines)
