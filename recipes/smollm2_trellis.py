"""The computed-codes trellis (L12 k2 walks in 32x8 tiles, ~2.06 bits) on SmolLM2-135M, then LoRA recovery.

lightning run recipes/smollm2_trellis.py [--config configs/smollm2_trellis.yaml] [key=value ...]
"""

from pathlib import Path

from lit_cb.config import RunConfig

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smollm2_trellis.yaml"


def main(cfg: RunConfig) -> dict:
    from lit_cb.pipeline import run  # imported here: loading a recipe (for --help) stays torch-free

    return run(cfg)


if __name__ == "__main__":
    import sys

    from lit_cb.cli import run_recipe

    run_recipe(__file__, sys.argv[1:])
