"""The comparison report: one model, one calibration set, one evaluation protocol, many methods.

Users pick a compressor by comparing it with what they would use instead, so every row of the
report is measured under exactly the same conditions: the same float model (one master copy,
deep-copied per method), the same calibration windows (drawn once, fed to every Hessian-based
method), the same evaluation windows and the same evaluation dtype. Rows of finished
``lit_cb`` runs (``outputs/<run>/metrics.json``) can be collected next to the computed ones.

Outputs, in ``output_dir/run_name``:

* ``report.json``: ``{"model", "protocol", "device", "versions", "date", "command", "config",
  "rows": [{"method", "bits_per_weight", "bits_per_weight_whole_model", "wikitext2_ppl",
  "seconds", ...}]}``;
* ``report.md``: the same rows as a markdown table;
* ``pareto.png``: perplexity (log scale) against bits per weight, each point labelled.

``bits_per_weight`` is counted over the quantized linears only (codes + scales + zeros +
codebooks, as the layers store them; LoRA adapters that stay unmerged at 16 bits), so methods are
compared on what they actually change; the whole-model figure (every other parameter at 16 bits)
sits next to it.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import importlib.metadata
import json
import math
import platform
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lit_cb.architectures import check_model, spec_for
from lit_cb.compress import DEFAULT_TARGETS, bits_per_weight, compress_model
from lit_cb.config import TrainerConfig
from lit_cb.configs.report import (  # noqa: F401 (re-exported: the config lives torch-free)
    METHODS,
    ReportConfig,
    ReportEvalConfig,
    _parse_collect,
)
from lit_cb.data.datamodule import CompressionDataModule
from lit_cb.evaluate import perplexity
from lit_cb.models import DTYPES, EMBEDDED_FAMILIES, load_model
from lit_cb.quant.bnb import BnbConfig, bnb_bits_per_weight, swap_linears_bnb4

_SCALAR = re.compile(r"^(rtn|gptq)_(\d)bit$")
VERSIONED_PACKAGES = ("lit_cb", "torch", "transformers", "lightning", "peft", "bitsandbytes")


# -- devices and helpers ----------------------------------------------------------------------------
def report_device(trainer: TrainerConfig) -> torch.device:
    """The device every row runs on: CUDA when asked for (or 'auto' and present), else CPU."""
    if trainer.accelerator in ("gpu", "cuda") or (trainer.accelerator == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.accelerator asks for a GPU but torch sees none")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decoder_linear_selector(targets: str = DEFAULT_TARGETS, layers: str = "layers"):
    """``(name, module) -> bool`` taking the target linears inside the decoder blocks only
    (``...<layers>.<i>.<target>``, ``layers`` being the family's block list, e.g.
    ``gpt_neox.layers``): embeddings and the output head stay in the float dtype."""
    block = re.compile(rf"(^|\.){re.escape(layers)}\.\d+\.")
    target = re.compile(targets)

    def select(name: str, module: nn.Module) -> bool:
        return bool(block.search(name)) and bool(target.search(name))

    return select


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in VERSIONED_PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU {platform.machine()} {platform.processor() or ''} ({torch.get_num_threads()} threads)".strip()


def bnb_model_bits(model: nn.Module, bnb_bits: float) -> dict[str, float]:
    """Bits/weight of a model whose target linears are ``bnb.nn.Linear4bit``: ``bnb_bits`` per
    quantized weight plus 16 bits per LoRA parameter (adapters kept unmerged), over the quantized
    linears and over the whole model (everything else at 16 bits, tied weights once)."""
    import bitsandbytes as bnb

    quant_weights = 0
    packed: set[int] = set()
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            quant_weights += m.in_features * m.out_features
            packed.add(id(m.weight))
    lora = 0
    other = 0
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen or id(p) in packed:
            continue
        seen.add(id(p))
        if "lora_" in name:
            lora += p.numel()
        else:
            other += p.numel()
    if quant_weights == 0:
        raise ValueError("the model holds no bitsandbytes Linear4bit layer")
    linear_bits = bnb_bits * quant_weights + 16.0 * lora
    return {
        "compressed_linears": linear_bits / quant_weights,
        "whole_model": (linear_bits + 16.0 * other) / (quant_weights + other),
        "lora_params": lora,
    }


# -- the report -------------------------------------------------------------------------------------
class ComparisonReport:
    """Runs the configured methods on one model and protocol and writes the three outputs.

    The float master model stays on the CPU in ``model.dtype``; each row deep-copies it, so no
    method sees another's changes. Calibration and evaluation windows are built once.
    """

    def __init__(self, config: ReportConfig, command: str | None = None) -> None:
        self.config = config
        self.command = command if command is not None else " ".join(sys.argv)
        self.device = report_device(config.trainer)
        self.eval_dtype = DTYPES[config.eval.dtype]
        self.rows: list[dict] = []
        self._model: nn.Module | None = None
        self._tokenizer = None
        self._dm: CompressionDataModule | None = None

    def variant(self, **changes: Any) -> ComparisonReport:
        """A report with some config fields changed (e.g. ``rtn={...}``) that shares this one's
        loaded model, tokenizer and windows, so a sweep costs no reloading and sees the same data."""
        other = ComparisonReport(dataclasses.replace(self.config, **changes), self.command)
        self.load()
        other._model, other._tokenizer, other._dm = self._model, self._tokenizer, self._dm
        return other

    # -- shared pieces --------------------------------------------------------------------------
    def load(self) -> None:
        if self._model is None:
            check_model(
                self.config.model.name,
                self.config.model.architecture,
                EMBEDDED_FAMILIES,
                self.config.data.calibration_seqlen,
            )
            self._model, self._tokenizer = load_model(self.config.model.name, self.config.model.dtype)
            self._dm = CompressionDataModule(self._tokenizer, self.config.data)

    @property
    def datamodule(self) -> CompressionDataModule:
        self.load()
        return self._dm

    def fresh_model(self) -> nn.Module:
        """A private copy of the float master model (CPU, ``model.dtype``)."""
        self.load()
        return copy.deepcopy(self._model)

    def evaluate(self, model: nn.Module) -> float:
        """Perplexity on the shared evaluation windows, the model cast to ``eval.dtype`` on the
        report device, autocast explicitly off (the dtype alone sets the arithmetic)."""
        model.to(device=self.device, dtype=self.eval_dtype)
        with torch.autocast(self.device.type, enabled=False):
            return perplexity(
                model,
                self.datamodule.test_windows(),
                self.config.eval.batch_size,
                self.device,
                progress=self.config.progress,
                desc="eval",
            )

    # -- methods --------------------------------------------------------------------------------
    def run_fp16(self) -> dict:
        model = self.fresh_model()
        t = time.perf_counter()
        ppl = self.evaluate(model)
        return {
            "method": "fp16",
            "bits_per_weight": 16.0,
            "bits_per_weight_whole_model": 16.0,
            "wikitext2_ppl": ppl,
            "seconds": time.perf_counter() - t,
            "eval_seconds": time.perf_counter() - t,
            "settings": {"eval_dtype": self.config.eval.dtype},
            "notes": f"float model cast to {self.config.eval.dtype}",
        }

    def _bnb_model(self, quant_type: str) -> tuple[nn.Module, BnbConfig]:
        """The master model on the device in ``eval.dtype`` with its decoder-block linears swapped
        for bitsandbytes Linear4bit (quantized from that dtype, as ``load_in_4bit`` would)."""
        bcfg = self.config.bnb_config(quant_type)
        model = self.fresh_model().to(device=self.device, dtype=self.eval_dtype)
        spec = spec_for(model)
        targets = spec.compression_targets(self.config.compression.get("targets", DEFAULT_TARGETS))
        swap_linears_bnb4(model, bcfg, include=decoder_linear_selector(targets, spec.layers))
        return model, bcfg

    def run_bnb(self, quant_type: str) -> dict:
        t = time.perf_counter()
        model, bcfg = self._bnb_model(quant_type)
        _sync(self.device)
        t_quant = time.perf_counter() - t
        bits = bnb_model_bits(model, bnb_bits_per_weight(bcfg))
        t_eval = time.perf_counter()
        ppl = self.evaluate(model)
        return {
            "method": f"bnb_{quant_type}",
            "bits_per_weight": bits["compressed_linears"],
            "bits_per_weight_whole_model": bits["whole_model"],
            "wikitext2_ppl": ppl,
            "seconds": time.perf_counter() - t,
            "quantize_seconds": t_quant,
            "eval_seconds": time.perf_counter() - t_eval,
            "settings": asdict(bcfg),
            "notes": "bitsandbytes Linear4bit, decoder-block linears; embeddings and head unquantized",
        }

    def run_qlora(self) -> dict:
        """NF4 model + LoRA trained by :class:`RecoveryModule` in a real Lightning Trainer. The
        adapters stay unmerged (merging into NF4 would requantize them away), so they are counted
        at 16 bits per parameter in the bits/weight."""
        import lightning as L
        from lightning.pytorch.loggers import CSVLogger

        from lit_cb.recovery import RecoveryModule

        cfg = self.config
        t = time.perf_counter()
        model, bcfg = self._bnb_model("nf4")
        dm = self.datamodule
        # Distillation (recovery.distill_alpha > 0) learns from the float model in eval.dtype on the device.
        teacher = (
            self.fresh_model().to(device=self.device, dtype=self.eval_dtype) if cfg.recovery.distill_alpha else None
        )
        module = RecoveryModule(model, cfg.recovery, teacher=teacher)
        trainer = L.Trainer(
            accelerator="gpu" if self.device.type == "cuda" else "cpu",
            devices=1,
            precision=cfg.trainer.precision,
            max_steps=cfg.recovery.max_steps,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            log_every_n_steps=cfg.trainer.log_every_n_steps,
            accumulate_grad_batches=cfg.trainer.accumulate_grad_batches,
            gradient_clip_val=cfg.recovery.grad_clip or None,
            logger=CSVLogger(cfg.run_dir, name="qlora_logs"),
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=cfg.progress,
        )
        trainer.fit(module, datamodule=dm)
        _sync(self.device)
        t_train = time.perf_counter() - t
        trained = module.model
        bits = bnb_model_bits(trained, bnb_bits_per_weight(bcfg))
        t_eval = time.perf_counter()
        ppl = self.evaluate(trained)
        return {
            "method": "qlora_nf4",
            "bits_per_weight": bits["compressed_linears"],
            "bits_per_weight_whole_model": bits["whole_model"],
            "wikitext2_ppl": ppl,
            "seconds": time.perf_counter() - t,
            "quantize_and_train_seconds": t_train,
            "eval_seconds": time.perf_counter() - t_eval,
            "steps": trainer.global_step,
            "settings": {**asdict(bcfg), "recovery": cfg.recovery.to_dict(), "precision": cfg.trainer.precision},
            "notes": f"NF4 + LoRA r={cfg.recovery.lora_r}, {trainer.global_step} steps; adapters unmerged, "
            f"{bits['lora_params']} LoRA params counted at 16 bits",
        }

    def run_scalar(self, kind: str, bits: int) -> dict:
        """RTN or GPTQ through the sequential compression driver, on the shared calibration
        windows (RTN ignores the Hessians, but the driver still measures each layer's error)."""
        method_cfg = self.config.rtn_config(bits) if kind == "rtn" else self.config.gptq_config(bits)
        ccfg = self.config.compression_config(kind, asdict(method_cfg))
        windows = self.datamodule.calibration_windows()
        model = self.fresh_model().float()
        t = time.perf_counter()
        rep = compress_model(model, windows, ccfg, device=self.device, progress=self.config.progress)
        _sync(self.device)
        t_quant = time.perf_counter() - t
        bpw = bits_per_weight(model)
        errors = [layer.relative_error for layer in rep.layers]
        t_eval = time.perf_counter()
        ppl = self.evaluate(model)
        gs = method_cfg.group_size
        return {
            "method": f"{kind}_{bits}bit",
            "bits_per_weight": bpw["compressed_linears"],
            "bits_per_weight_whole_model": bpw["whole_model"],
            "wikitext2_ppl": ppl,
            "seconds": time.perf_counter() - t,
            "quantize_seconds": t_quant,
            "eval_seconds": time.perf_counter() - t_eval,
            "mean_relative_layer_error": sum(errors) / len(errors) if errors else None,
            "settings": asdict(method_cfg),
            "notes": f"{'asymmetric' if not method_cfg.symmetric else 'symmetric'} "
            f"{'per-row' if gs == -1 else f'group {gs}'}, fp16 scales and zeros",
        }

    def run_method(self, name: str) -> dict:
        if name not in METHODS:
            raise ValueError(f"unknown report method {name!r}; allowed: {list(METHODS)}")
        if name == "fp16":
            return self.run_fp16()
        if name in ("bnb_nf4", "bnb_fp4"):
            return self.run_bnb(name.removeprefix("bnb_"))
        if name == "qlora_nf4":
            return self.run_qlora()
        kind, bits = _SCALAR.match(name).groups()
        return self.run_scalar(kind, int(bits))

    # -- collected runs -------------------------------------------------------------------------
    def collect_rows(self, entry: str) -> list[dict]:
        """Rows of a finished lit_cb run: ``<name>`` (compressed) and ``<name>_recovered``.
        A run measured under another model or evaluation protocol is still listed, flagged."""
        name, run_dir = _parse_collect(entry)
        path = run_dir / "metrics.json" if run_dir.is_dir() else run_dir
        if not path.is_file():
            raise FileNotFoundError(f"collect: {path} does not exist (a finished lit_cb run writes metrics.json)")
        metrics = json.loads(path.read_text())
        name = name or metrics.get("method") or path.parent.name
        ppl = metrics.get("wikitext2_ppl") or {}
        bpw = metrics.get("bits_per_weight") or {}
        mismatch = self._protocol_mismatch(path.parent / "run_config.yaml")
        base = {
            "bits_per_weight": bpw.get("compressed_linears"),
            "bits_per_weight_whole_model": bpw.get("whole_model"),
            "source": str(path),
            "settings": {"run_name": metrics.get("run_name"), "method": metrics.get("method")},
        }
        stages = metrics.get("stages") or {}
        rows = []
        if "compressed" in ppl:
            rows.append(
                {
                    **base,
                    "method": name,
                    "wikitext2_ppl": ppl["compressed"],
                    "seconds": (stages.get("compress") or {}).get("seconds"),
                }
            )
        if "recovered" in ppl:
            recovered_bpw = metrics.get("bits_per_weight_recovered") or bpw
            rows.append(
                {
                    **base,
                    "bits_per_weight": recovered_bpw.get("compressed_linears"),
                    "bits_per_weight_whole_model": recovered_bpw.get("whole_model"),
                    "method": f"{name}_recovered",
                    "wikitext2_ppl": ppl["recovered"],
                    "seconds": sum((stages.get(k) or {}).get("seconds") or 0.0 for k in ("compress", "recover")),
                    "notes": "adapters merged; bits/weight counted after the merge",
                }
            )
        if not rows:
            raise ValueError(f"collect: {path} holds no compressed or recovered perplexity")
        for row in rows:
            if mismatch:
                row["notes"] = "; ".join(filter(None, [row.get("notes"), f"PROTOCOL DIFFERS: {mismatch}"]))
        return rows

    def _protocol_mismatch(self, run_config: Path) -> str:
        if not run_config.is_file():
            return "no run_config.yaml to compare"
        import yaml

        other = yaml.safe_load(run_config.read_text()) or {}
        diffs = []
        if (other.get("model") or {}).get("name") != self.config.model.name:
            diffs.append(f"model {(other.get('model') or {}).get('name')}")
        mine = self.config.data.to_dict()
        for key in ("eval_source", "eval_seqlen", "max_eval_windows"):
            if (other.get("data") or {}).get(key) != mine[key]:
                diffs.append(f"data.{key}={(other.get('data') or {}).get(key)}")
        return ", ".join(diffs)

    # -- protocol and outputs -------------------------------------------------------------------
    def protocol(self) -> dict:
        d = self.config.data
        test = self.datamodule.test_windows()
        return {
            "eval_source": d.eval_source,
            "eval_windows": int(test.shape[0]),
            "eval_seqlen": d.eval_seqlen,
            "eval_tokens": int(test.numel()),
            "eval_dtype": self.config.eval.dtype,
            "autocast": None,
            "calibration_source": d.calibration_source,
            "calibration_samples": d.num_calibration_samples,
            "calibration_seqlen": d.calibration_seqlen,
            "calibration_sampling": d.calibration_sampling,
            "seed": self.config.seed,
            "bits_per_weight": "over the quantized linears: codes + scales + zeros + codebooks as stored, "
            "LoRA adapters (when unmerged) at 16 bits; embeddings, head and norms excluded",
        }

    def run(self) -> dict:
        """Compute every configured method, collect finished runs, write the outputs."""
        import lightning as L

        cfg = self.config
        L.seed_everything(cfg.seed, workers=True)
        out_dir = cfg.run_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in cfg.methods:
            L.seed_everything(cfg.seed, workers=True)
            row = self.run_method(name)
            self.rows.append(row)
            print(
                f"[report] {row['method']:>12}: {row['bits_per_weight']:.3f} bits/weight, "
                f"ppl {row['wikitext2_ppl']:.3f} ({row['seconds']:.1f} s)",
                flush=True,
            )
            self.write(out_dir)  # partial results survive a later failure
        for entry in cfg.collect:
            self.rows.extend(self.collect_rows(entry))
        return self.write(out_dir)

    def result(self) -> dict:
        return {
            "model": self.config.model.name,
            "protocol": self.protocol(),
            "device": _device_description(self.device),
            "versions": _versions(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": self.command,
            "config": self.config.to_dict(),
            "rows": self.rows,
        }

    def write(self, out_dir: Path) -> dict:
        result = self.result()
        (out_dir / "report.json").write_text(json.dumps(result, indent=1, default=str))
        (out_dir / "report.md").write_text(render_markdown(result))
        if self.rows:
            plot_pareto(self.rows, out_dir / "pareto.png", title=f"{result['model']}: WikiText-2 perplexity")
        return result


# -- rendering ----------------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if abs(value) >= 1e4:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def render_markdown(result: dict) -> str:
    """The report as markdown: provenance, the protocol, then one table row per method."""
    p = result["protocol"]
    fp16 = next((r["wikitext2_ppl"] for r in result["rows"] if r["method"] == "fp16"), None)
    lines = [
        f"# Compression comparison: {result['model']}",
        "",
        f"- device: {result['device']}; date: {result['date']}",
        f"- command: `{result['command']}`",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        f"- evaluation: {p['eval_source']}, {p['eval_windows']} non-overlapping windows of {p['eval_seqlen']} tokens "
        f"({p['eval_tokens']} tokens), model cast to {p['eval_dtype']}, autocast off",
        f"- calibration (GPTQ/RTN Hessians, shared by all rows): {p['calibration_samples']} x "
        f"{p['calibration_seqlen']} tokens of {p['calibration_source']} ({p['calibration_sampling']} sampling), "
        f"seed {p['seed']}",
        "- **bits/weight** is counted over the quantized linears only (codes + scales + zeros + codebooks as "
        "they are stored; unmerged LoRA adapters at 16 bits); the whole-model column adds every other "
        "parameter (embeddings, head, norms) at 16 bits, tied weights once.",
        "",
        "| method | bits/weight (quantized linears) | bits/weight (whole model) | WikiText-2 ppl | vs fp16 "
        "| seconds | notes |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        ppl = r.get("wikitext2_ppl")
        rel = f"x{ppl / fp16:.2f}" if fp16 and ppl is not None and r["method"] != "fp16" else ""
        lines.append(
            f"| {r['method']} | {_fmt(r.get('bits_per_weight'))} | {_fmt(r.get('bits_per_weight_whole_model'))} "
            f"| {_fmt(ppl, 2)} | {rel} | {_fmt(r.get('seconds'), 1)} | {r.get('notes', '')} |"
        )
    return "\n".join(lines) + "\n"


def pareto_front(rows: list[dict]) -> list[dict]:
    """Rows no other row beats on both bits/weight and perplexity, by increasing bits."""
    pts = [r for r in rows if r.get("bits_per_weight") is not None and _finite(r.get("wikitext2_ppl"))]
    front = []
    best = math.inf
    for r in sorted(pts, key=lambda r: (r["bits_per_weight"], r["wikitext2_ppl"])):
        if r["wikitext2_ppl"] < best:
            front.append(r)
            best = r["wikitext2_ppl"]
    return front


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def plot_pareto(rows: list[dict], path: Path, title: str = "") -> None:
    """Perplexity (log y) against bits/weight, each point labelled, the Pareto front joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r.get("bits_per_weight") is not None and _finite(r.get("wikitext2_ppl"))]
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    families = sorted({r["method"].split("_")[0] for r in pts})
    colors = {f: plt.get_cmap("tab10")(i % 10) for i, f in enumerate(families)}
    for r in pts:
        family = r["method"].split("_")[0]
        ax.scatter(r["bits_per_weight"], r["wikitext2_ppl"], s=36, zorder=3, label=family, color=colors[family])
        ax.annotate(
            r["method"],
            (r["bits_per_weight"], r["wikitext2_ppl"]),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=8,
        )
    front = pareto_front(pts)
    if len(front) > 1:
        ax.plot([r["bits_per_weight"] for r in front], [r["wikitext2_ppl"] for r in front], "--", color="grey", lw=1)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="upper right")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (quantized linears)")
    ax.set_ylabel("WikiText-2 perplexity (log scale)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_report(config: ReportConfig, command: str | None = None) -> dict:
    """Run the comparison report described by ``config``; returns what ``report.json`` holds."""
    return ComparisonReport(config, command).run()
