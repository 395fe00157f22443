"""bitsandbytes 4-bit baselines on LLaMA-7B: fp16, NF4, FP4 and QLoRA (NF4 + LoRA trained by the same
RecoveryModule in a Lightning Trainer), as a comparison report. Needs a GPU and local weights
(set model.name to a Hugging Face folder).

lightning run recipes/llama7b_bnb4.py [--config configs/llama7b_bnb4.yaml] model.name=/path/to/llama-7b-hf
"""

from pathlib import Path

from lit_cb.configs.report import ReportConfig

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "llama7b_bnb4.yaml"
CONFIG_CLASS = ReportConfig


def main(cfg: ReportConfig) -> dict:
    if cfg.model.requires_gpu:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(f"recipe {cfg.run_name!r} needs a GPU (model {cfg.model.name}); none is visible")
    from lit_cb.report import run_report

    return run_report(cfg)


if __name__ == "__main__":
    import sys

    from lit_cb.cli import run_recipe

    run_recipe(__file__, sys.argv[1:])
