"""``pareto.png``: perplexity against bits per weight, and the rows no other row beats on both."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


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
    ax.set_xlabel("bits per weight (quantized linears, nominal)")
    ax.set_ylabel("WikiText-2 perplexity (log scale)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
