"""The comparison report itself: one model, one calibration set, one evaluation protocol, many
methods; the rows come from :mod:`lit_cb.report.baselines` and :mod:`lit_cb.report.collected`, the
outputs from :mod:`lit_cb.report.markdown` and :mod:`lit_cb.report.pareto`."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lit_cb.architectures import check_model
from lit_cb.configs.report import ReportConfig
from lit_cb.data.datamodule import CompressionDataModule
from lit_cb.environment import device_description, package_versions
from lit_cb.evaluate import perplexity
from lit_cb.models import DTYPES, EMBEDDED_FAMILIES, load_model
from lit_cb.report.baselines import BaselineRows
from lit_cb.report.collected import CollectedRows
from lit_cb.report.environment import report_device
from lit_cb.report.markdown import render_markdown
from lit_cb.report.pareto import plot_pareto


# -- the report -------------------------------------------------------------------------------------
class ComparisonReport(BaselineRows, CollectedRows):
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
            "bits_per_weight": "nominal, over the quantized linears: codes at their bits + fp16 scales, zeros "
            "and codebooks, LoRA adapters (unmerged or merged) at 16 bits; embeddings, head and norms excluded",
            "bits_per_weight_on_disk": "measured: bytes x 8 of the tensors the quantized linears write to a saved "
            "lit_cb folder (codes bit-packed), over their weights; None for rows lit_cb does not save",
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
            "device": device_description(self.device),
            "versions": package_versions(),
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


def run_report(config: ReportConfig, command: str | None = None) -> dict:
    """Run the comparison report described by ``config``; returns what ``report.json`` holds."""
    return ComparisonReport(config, command).run()
