"""LLM-Codebook on Pythia-6.9B (GPT-NeoX layout): codebooks + LoRA recovery (needs a GPU and local weights).

lightning run recipes/pythia_6_9b_codebook.py model.name=/path/to/pythia-6.9b [key=value ...]
"""

from pathlib import Path

from lit_cb.config import RunConfig

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pythia_6_9b_codebook.yaml"


def main(cfg: RunConfig) -> dict:
    from lit_cb.pipeline import run  # imported here: loading a recipe (for --help) stays torch-free

    return run(cfg)


if __name__ == "__main__":
    import sys

    from lit_cb.cli import run_recipe

    run_recipe(__file__, sys.argv[1:])
