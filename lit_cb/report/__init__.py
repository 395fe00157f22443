"""The comparison report: one model, one calibration set, one evaluation protocol, many methods.

Users pick a compressor by comparing it with what they would use instead, so every row of the
report is measured under exactly the same conditions: the same float model (one master copy,
deep-copied per method), the same calibration windows (drawn once, fed to every Hessian-based
method), the same evaluation windows and the same evaluation dtype. Rows of finished
``lit_cb`` runs (``outputs/<run>/metrics.json``) can be collected next to the computed ones.

Outputs, in ``output_dir/run_name``:

* ``report.json``: ``{"model", "protocol", "device", "versions", "date", "command", "config",
  "rows": [{"method", "bits_per_weight", "bits_per_weight_on_disk", "bits_per_weight_whole_model",
  "wikitext2_ppl",
  "seconds", ...}]}``;
* ``report.md``: the same rows as a markdown table;
* ``pareto.png``: perplexity (log scale) against bits per weight, each point labelled.

``bits_per_weight`` (nominal) is counted over the quantized linears only (codes at their bits +
fp16 scales, zeros and codebooks; LoRA adapters at 16 bits), so methods are compared on what they
actually change; the whole-model figure (every other parameter at 16 bits) sits next to it.
``bits_per_weight_on_disk`` is measured: the bytes of the tensors the quantized linears write to a
saved lit_cb folder (codes bit-packed, :mod:`lit_cb.bitpack`), for the rows lit_cb saves.

The package: :mod:`~lit_cb.report.comparison` (the report: shared model and windows, outputs),
:mod:`~lit_cb.report.baselines` (fp16, bitsandbytes, QLoRA, RTN/GPTQ rows),
:mod:`~lit_cb.report.collected` (rows of finished runs), :mod:`~lit_cb.report.markdown` (``report.md``),
:mod:`~lit_cb.report.pareto` (``pareto.png``), :mod:`~lit_cb.report.environment` (device, versions).
"""

from lit_cb.configs.report import (  # noqa: F401 (re-exported: the config lives torch-free)
    METHODS,
    ReportConfig,
    ReportEvalConfig,
    _parse_collect,
)
from lit_cb.environment import VERSIONED_PACKAGES
from lit_cb.report.baselines import BaselineRows, bnb_model_bits, decoder_linear_selector
from lit_cb.report.collected import CollectedRows
from lit_cb.report.comparison import ComparisonReport, run_report
from lit_cb.report.environment import report_device
from lit_cb.report.markdown import render_markdown
from lit_cb.report.pareto import pareto_front, plot_pareto

__all__ = [
    "METHODS",
    "VERSIONED_PACKAGES",
    "BaselineRows",
    "CollectedRows",
    "ComparisonReport",
    "ReportConfig",
    "ReportEvalConfig",
    "bnb_model_bits",
    "decoder_linear_selector",
    "pareto_front",
    "plot_pareto",
    "render_markdown",
    "report_device",
    "run_report",
]
