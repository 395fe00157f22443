"""``report.md``: the report's provenance, protocol and one table row per method."""

from __future__ import annotations

import math
from typing import Any


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
        "- **bits/weight, nominal** is counted over the quantized linears only (codes at their bits + fp16 "
        "scales, zeros and codebooks; LoRA adapters at 16 bits); the whole-model column adds every other "
        "parameter (embeddings, head, norms) at 16 bits, tied weights once. **on disk** is measured: the bytes "
        "x 8 of the tensors the quantized linears write to a saved lit_cb folder (codes bit-packed), over "
        "their weights (– where lit_cb does not save the row's model).",
        "",
        "| method | bits/weight, nominal (quantized linears) | bits/weight on disk (quantized linears) "
        "| bits/weight, nominal (whole model) | WikiText-2 ppl | vs fp16 | seconds | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        ppl = r.get("wikitext2_ppl")
        rel = f"x{ppl / fp16:.2f}" if fp16 and ppl is not None and r["method"] != "fp16" else ""
        lines.append(
            f"| {r['method']} | {_fmt(r.get('bits_per_weight'))} | {_fmt(r.get('bits_per_weight_on_disk'))} "
            f"| {_fmt(r.get('bits_per_weight_whole_model'))} "
            f"| {_fmt(ppl, 2)} | {rel} | {_fmt(r.get('seconds'), 1)} | {r.get('notes', '')} |"
        )
    return "\n".join(lines) + "\n"
