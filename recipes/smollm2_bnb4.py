"""bitsandbytes 4-bit baselines on the embedded SmolLM2-135M: NF4, FP4 and QLoRA (NF4 + LoRA trained
by the same RecoveryModule in a Lightning Trainer), next to the float model, as a comparison report.

lightning run recipes/smollm2_bnb4.py [--config configs/smollm2_bnb4.yaml] [key=value ...]
"""

from pathlib import Path

from lit_cb.configs.report import ReportConfig

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smollm2_bnb4.yaml"
CONFIG_CLASS = ReportConfig


def main(cfg: ReportConfig) -> dict:
    from lit_cb.report import run_report  # imported here: loading a recipe (for --help) stays torch-free

    return run_report(cfg)


if __name__ == "__main__":
    import sys

    from lit_cb.cli import run_recipe

    run_recipe(__file__, sys.argv[1:])
