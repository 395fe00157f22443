"""AQLM on Qwen2-7B: 2x8 g8 codes by beam search, block fine-tuning (needs a GPU and local weights).

lightning run recipes/qwen2_7b_aqlm.py model.name=/path/to/Qwen2-7B [key=value ...]
"""

from pathlib import Path

from lit_cb.config import RunConfig

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "qwen2_7b_aqlm.yaml"


def main(cfg: RunConfig) -> dict:
    from lit_cb.pipeline import run  # imported here: loading a recipe (for --help) stays torch-free

    return run(cfg)


if __name__ == "__main__":
    import sys

    from lit_cb.cli import run_recipe

    run_recipe(__file__, sys.argv[1:])
