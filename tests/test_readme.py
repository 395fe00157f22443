"""README figures that cannot go stale: the CPU demo paragraph and time are generated from
``bench/results/cpu_demo.json`` (``scripts/readme_figures.py``); this fails while they disagree."""

from __future__ import annotations

import json

from .conftest import load_script


def _figures():
    return load_script("scripts/readme_figures.py")


def test_readme_demo_figures_match_the_results_file():
    figures = _figures()
    record = json.loads(figures.RESULTS.read_text())
    assert not record["smoke"], "cpu_demo.json must come from the real demo, not --smoke"
    readme = figures.README.read_text()
    assert figures.render(readme, record) == readme, "run: python scripts/readme_figures.py --write"


def test_a_changed_figure_is_caught():
    figures = _figures()
    record = json.loads(figures.RESULTS.read_text())
    readme = figures.README.read_text()
    record["metrics"]["wikitext2_ppl"]["recovered"] += 1.0
    assert figures.render(readme, record) != readme
    record["wall_seconds"] += 600
    assert f"about {record['wall_seconds'] / 60:.0f} minutes" in figures.render(readme, record)
