"""Comparison report on the embedded SmolLM2-135M: fp16, bitsandbytes NF4/FP4, QLoRA, RTN and GPTQ
under one calibration set and one evaluation protocol; writes report.json, report.md, pareto.png.

lightning run recipes/smollm2_report.py [--config configs/smollm2_report.yaml] [key=value ...]
Full protocol (GPU): --config configs/smollm2_report_full.yaml output_dir=$OUT
"""

from pathlib import Path

from lit_cb.configs.report import ReportConfig

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smollm2_report.yaml"
CONFIG_CLASS = ReportConfig


def main(cfg: ReportConfig) -> dict:
    from lit_cb.report import run_report  # imported here: loading a recipe (for --help) stays torch-free

    return run_report(cfg)


if __name__ == "__main__":
    import sys

    from lit_cb.cli import run_recipe

    run_recipe(__file__, sys.argv[1:])
