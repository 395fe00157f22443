"""Write the README's CPU demo figures from ``bench/results/cpu_demo.json`` (``bench/cpu_demo.py``
makes that file), so they cannot go stale: ``tests/test_readme.py`` fails while they disagree.

    python scripts/readme_figures.py --write     # rewrite the README sections from the file
    python scripts/readme_figures.py --check     # exit 1 and show the difference if they disagree

Two places are generated: the demo paragraph between ``<!-- cpu-demo:begin -->`` and
``<!-- cpu-demo:end -->``, and the demo time in the quick start's first comment.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "bench" / "results" / "cpu_demo.json"
BEGIN, END = "<!-- cpu-demo:begin -->", "<!-- cpu-demo:end -->"
QUICK_START = re.compile(r"(end to end on a CPU )\([^)\n]*\)")
STAGE_WORDS = {
    "load": "load",
    "eval_float": "float eval",
    "compress": "compression",
    "eval_compressed": "compressed eval",
    "recover": "recovery",
    "eval_recovered": "recovered eval",
    "save": "save",
}


def _num(x: float) -> str:
    """A figure to 2 decimals at most, without inventing digits the file does not hold."""
    return f"{round(x, 2):g}"


def demo_paragraph(record: dict) -> str:
    """The README paragraph for one ``cpu_demo.json`` record."""
    cfg, metrics, machine = record["run_config"], record["metrics"], record["machine"]
    data, rec = cfg["data"], cfg["recovery"]
    ppl = metrics["wikitext2_ppl"]
    stages = ", ".join(
        f"{word} {metrics['stages'][name]['seconds']:.0f} s"
        for name, word in STAGE_WORDS.items()
        if metrics["stages"].get(name, {}).get("seconds") is not None
    )
    windows = data["max_eval_windows"] or "all"
    if record.get("provenance"):
        measured = record["provenance"]
    else:
        before, after = machine["load_average_before"][0], machine["load_average_after"][0]
        measured = (
            f"Measured {record['date']} ({machine['cpu']}; 1-minute load average {before:.1f} when it started, "
            f"{after:.1f} when it ended) by `python bench/cpu_demo.py`; the figures come from "
            "`bench/results/cpu_demo.json`."
        )
    text = (
        f"On {machine['cores']} CPU cores the demo config ({data['num_calibration_samples']} × "
        f"{data['calibration_seqlen']}-token calibration windows, {windows} evaluation windows of "
        f"{data['eval_seqlen']} tokens, {rec['max_steps']} LoRA steps of rank {rec['lora_r']}) took "
        f"{record['wall_seconds'] / 60:.1f} minutes ({stages}) and printed float {_num(ppl['float'])}, "
        f"compressed {_num(ppl['compressed'])}, recovered {_num(ppl['recovered'])} at "
        f"{metrics['bits_per_weight']['compressed_linears']:.3f} bits/weight "
        f"({_num(metrics['bits_per_weight_recovered']['compressed_linears'])} with the merged "
        f"rank-{rec['lora_r']} adapters); those {windows} windows are not comparable with the table. {measured}"
    )
    return "\n".join(textwrap.wrap(text, 100, break_on_hyphens=False))


def quick_start_note(record: dict) -> str:
    return f"(about {record['wall_seconds'] / 60:.0f} minutes on {record['machine']['cores']} cores)"


def render(readme: str, record: dict) -> str:
    """``readme`` with both generated places rewritten from ``record``."""
    if readme.count(BEGIN) != 1 or readme.count(END) != 1:
        raise ValueError(f"README must hold {BEGIN} and {END} once each")
    head, rest = readme.split(BEGIN)
    _, tail = rest.split(END)
    readme = f"{head}{BEGIN}\n{demo_paragraph(record)}\n{END}{tail}"
    if not QUICK_START.search(readme):
        raise ValueError("README's quick start has no 'end to end on a CPU (about ...)' comment")
    return QUICK_START.sub(lambda m: m.group(1) + quick_start_note(record), readme, count=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite README.md")
    mode.add_argument("--check", action="store_true", help="exit 1 if README.md disagrees with the results")
    args = parser.parse_args(argv)
    current = README.read_text()
    wanted = render(current, json.loads(RESULTS.read_text()))
    if args.write:
        README.write_text(wanted)
        return 0
    if current != wanted:
        sys.stdout.writelines(difflib.unified_diff(current.splitlines(True), wanted.splitlines(True), "README.md"))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
