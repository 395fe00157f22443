"""LLM-Codebook g4 B8 on SmolLM2-135M, recovered by long pure-KL distillation on C4 + teacher text.

lightning run recipes/smollm2_codebook_best.py [--config configs/smollm2_codebook_best.yaml] [key=value ...]
"""

from pathlib import Path

from lit_cb.config import RunConfig

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smollm2_codebook_best.yaml"


def main(cfg: RunConfig) -> dict:
    from lit_cb.pipeline import run  # imported here: loading a recipe (for --help) stays torch-free

    return run(cfg)


if __name__ == "__main__":
    import sys

    from lit_cb.cli import run_recipe

    run_recipe(__file__, sys.argv[1:])
