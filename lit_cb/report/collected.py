"""Rows of finished lit_cb runs (``outputs/<run>/metrics.json``) collected into the report, flagged when
their model or evaluation protocol differs from the report's.

:class:`CollectedRows` is a mixin of :class:`lit_cb.report.comparison.ComparisonReport`; the methods moved
here whole from it.
"""

from __future__ import annotations

import json
from pathlib import Path

from lit_cb.configs.report import ReportConfig, _parse_collect


class CollectedRows:
    """Rows read from finished runs (a mixin of ``ComparisonReport``)."""

    config: ReportConfig

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
        # Measured on the saved model/, i.e. after recovery; it is the compressed model's too when recovery
        # merged nothing into the compressed linears (the same nominal count before and after).
        on_disk = (metrics.get("bits_per_weight_on_disk") or {}).get("compressed_linears")
        merged = (metrics.get("bits_per_weight_recovered") or bpw).get("compressed_linears") != bpw.get(
            "compressed_linears"
        )
        mismatch = self._protocol_mismatch(path.parent / "run_config.yaml")
        reused = _blocks_from(path.parent / "run_config.yaml")
        base = {
            "bits_per_weight": bpw.get("compressed_linears"),
            "bits_per_weight_whole_model": bpw.get("whole_model"),
            "bits_per_weight_on_disk": None if merged else on_disk,
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
                    "bits_per_weight_on_disk": on_disk,
                    "method": f"{name}_recovered",
                    "wikitext2_ppl": ppl["recovered"],
                    "seconds": sum((stages.get(k) or {}).get("seconds") or 0.0 for k in ("compress", "recover")),
                    "notes": "adapters merged; bits/weight counted after the merge",
                }
            )
        if not rows:
            raise ValueError(f"collect: {path} holds no compressed or recovered perplexity")
        for row in rows:
            if reused:
                # The run loaded finished blocks (compression.blocks_from): its compress stage only read
                # them, so its seconds would pass for a compression many times faster than it was.
                row["notes"] = "; ".join(
                    filter(
                        None, [row.get("notes"), f"compressed blocks reused from {reused}: seconds exclude compression"]
                    )
                )
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


def _blocks_from(run_config: Path) -> str | None:
    """The ``compression.blocks_from`` a run was started from (None when it compressed itself)."""
    if not run_config.is_file():
        return None
    import yaml

    other = yaml.safe_load(run_config.read_text()) or {}
    return (other.get("compression") or {}).get("blocks_from") or None
