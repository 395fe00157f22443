"""The computed-codes trellis on llama7b: Viterbi walks in block-LDLQ + LoRA recovery (needs a GPU and local weights).

lightning run recipes/llama7b_trellis.py [--config configs/llama7b_trellis.yaml] [key=value ...]
"""

from pathlib import Path

from lit_cb.config import RunConfig

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "llama7b_trellis.yaml"


def main(cfg: RunConfig) -> dict:
    from lit_cb.pipeline import run  # imported here: loading a recipe (for --help) stays torch-free

    return run(cfg)


if __name__ == "__main__":
    import sys

    from lit_cb.cli import run_recipe

    run_recipe(__file__, sys.argv[1:])
