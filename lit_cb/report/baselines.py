"""The report's computed rows: fp16, bitsandbytes NF4/FP4, QLoRA (NF4 + LoRA trained in a Lightning
Trainer), and RTN/GPTQ through the compression driver.

:class:`BaselineRows` is a mixin of :class:`lit_cb.report.comparison.ComparisonReport`, which holds the
shared model, windows and evaluation these methods use; the methods moved here whole from it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import asdict

import torch
from torch import nn

from lit_cb.architectures import spec_for
from lit_cb.compress import DEFAULT_TARGETS, bits_per_weight, compress_model
from lit_cb.configs.report import METHODS, ReportConfig
from lit_cb.data.datamodule import CompressionDataModule
from lit_cb.quant.bnb import BnbConfig, bnb_bits_per_weight, swap_linears_bnb4
from lit_cb.report.environment import _sync
from lit_cb.serialization import measure_bits_on_disk

_SCALAR = re.compile(r"^(rtn|gptq)_(\d)bit$")


def decoder_linear_selector(targets: str = DEFAULT_TARGETS, layers: str = "layers"):
    """``(name, module) -> bool`` taking the target linears inside the decoder blocks only
    (``...<layers>.<i>.<target>``, ``layers`` being the family's block list, e.g.
    ``gpt_neox.layers``): embeddings and the output head stay in the float dtype."""
    block = re.compile(rf"(^|\.){re.escape(layers)}\.\d+\.")
    target = re.compile(targets)

    def select(name: str, module: nn.Module) -> bool:
        return bool(block.search(name)) and bool(target.search(name))

    return select


def bnb_model_bits(model: nn.Module, bnb_bits: float) -> dict[str, float]:
    """Bits/weight of a model whose target linears are ``bnb.nn.Linear4bit``: ``bnb_bits`` per
    quantized weight plus 16 bits per LoRA parameter (adapters kept unmerged), over the quantized
    linears and over the whole model (everything else at 16 bits, tied weights once)."""
    import bitsandbytes as bnb

    quant_weights = 0
    packed: set[int] = set()
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            quant_weights += m.in_features * m.out_features
            packed.add(id(m.weight))
    lora = 0
    other = 0
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen or id(p) in packed:
            continue
        seen.add(id(p))
        if "lora_" in name:
            lora += p.numel()
        else:
            other += p.numel()
    if quant_weights == 0:
        raise ValueError("the model holds no bitsandbytes Linear4bit layer")
    linear_bits = bnb_bits * quant_weights + 16.0 * lora
    return {
        "compressed_linears": linear_bits / quant_weights,
        "whole_model": (linear_bits + 16.0 * other) / (quant_weights + other),
        "lora_params": lora,
    }


class BaselineRows:
    """The computed rows of the comparison report (a mixin of ``ComparisonReport``)."""

    config: ReportConfig
    device: torch.device
    eval_dtype: torch.dtype
    datamodule: CompressionDataModule
    fresh_model: Callable[[], nn.Module]
    evaluate: Callable[[nn.Module], float]

    # -- methods --------------------------------------------------------------------------------
    def run_fp16(self) -> dict:
        model = self.fresh_model()
        t = time.perf_counter()
        ppl = self.evaluate(model)
        return {
            "method": "fp16",
            "bits_per_weight": 16.0,
            "bits_per_weight_whole_model": 16.0,
            "bits_per_weight_on_disk": 16.0,  # a float16 checkpoint: two bytes per weight
            "wikitext2_ppl": ppl,
            "seconds": time.perf_counter() - t,
            "eval_seconds": time.perf_counter() - t,
            "settings": {"eval_dtype": self.config.eval.dtype},
            "notes": f"float model cast to {self.config.eval.dtype}",
        }

    def _bnb_model(self, quant_type: str) -> tuple[nn.Module, BnbConfig]:
        """The master model on the device in ``eval.dtype`` with its decoder-block linears swapped
        for bitsandbytes Linear4bit (quantized from that dtype, as ``load_in_4bit`` would)."""
        bcfg = self.config.bnb_config(quant_type)
        model = self.fresh_model().to(device=self.device, dtype=self.eval_dtype)
        spec = spec_for(model)
        targets = spec.compression_targets(self.config.compression.get("targets", DEFAULT_TARGETS))
        swap_linears_bnb4(model, bcfg, include=decoder_linear_selector(targets, spec.layers))
        return model, bcfg

    def run_bnb(self, quant_type: str) -> dict:
        t = time.perf_counter()
        model, bcfg = self._bnb_model(quant_type)
        _sync(self.device)
        t_quant = time.perf_counter() - t
        bits = bnb_model_bits(model, bnb_bits_per_weight(bcfg))
        t_eval = time.perf_counter()
        ppl = self.evaluate(model)
        return {
            "method": f"bnb_{quant_type}",
            "bits_per_weight": bits["compressed_linears"],
            "bits_per_weight_whole_model": bits["whole_model"],
            "bits_per_weight_on_disk": None,  # not saved by lit_cb (bitsandbytes' own serialization)
            "wikitext2_ppl": ppl,
            "seconds": time.perf_counter() - t,
            "quantize_seconds": t_quant,
            "eval_seconds": time.perf_counter() - t_eval,
            "settings": asdict(bcfg),
            "notes": "bitsandbytes Linear4bit, decoder-block linears; embeddings and head unquantized",
        }

    def run_qlora(self) -> dict:
        """NF4 model + LoRA trained by :class:`RecoveryModule` in a real Lightning Trainer. The
        adapters stay unmerged (merging into NF4 would requantize them away), so they are counted
        at 16 bits per parameter in the bits/weight."""
        import lightning as L
        from lightning.pytorch.loggers import CSVLogger

        from lit_cb.recovery import RecoveryModule

        cfg = self.config
        t = time.perf_counter()
        model, bcfg = self._bnb_model("nf4")
        dm = self.datamodule
        # Distillation (recovery.distill_alpha > 0) learns from the float model in eval.dtype on the device.
        teacher = (
            self.fresh_model().to(device=self.device, dtype=self.eval_dtype) if cfg.recovery.distill_alpha else None
        )
        module = RecoveryModule(model, cfg.recovery, teacher=teacher)
        trainer = L.Trainer(
            accelerator="gpu" if self.device.type == "cuda" else "cpu",
            devices=1,
            precision=cfg.trainer.precision,
            max_steps=cfg.recovery.max_steps,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            log_every_n_steps=cfg.trainer.log_every_n_steps,
            accumulate_grad_batches=cfg.trainer.accumulate_grad_batches,
            gradient_clip_val=cfg.recovery.grad_clip or None,
            logger=CSVLogger(cfg.run_dir, name="qlora_logs"),
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=cfg.progress,
        )
        trainer.fit(module, datamodule=dm)
        _sync(self.device)
        t_train = time.perf_counter() - t
        trained = module.model
        bits = bnb_model_bits(trained, bnb_bits_per_weight(bcfg))
        t_eval = time.perf_counter()
        ppl = self.evaluate(trained)
        return {
            "method": "qlora_nf4",
            "bits_per_weight": bits["compressed_linears"],
            "bits_per_weight_whole_model": bits["whole_model"],
            "bits_per_weight_on_disk": None,  # not saved by lit_cb (bitsandbytes' own serialization)
            "wikitext2_ppl": ppl,
            "seconds": time.perf_counter() - t,
            "quantize_and_train_seconds": t_train,
            "eval_seconds": time.perf_counter() - t_eval,
            "steps": trainer.global_step,
            "settings": {**asdict(bcfg), "recovery": cfg.recovery.to_dict(), "precision": cfg.trainer.precision},
            "notes": f"NF4 + LoRA r={cfg.recovery.lora_r}, {trainer.global_step} steps; adapters unmerged, "
            f"{bits['lora_params']} LoRA params counted at 16 bits",
        }

    def run_scalar(self, kind: str, bits: int) -> dict:
        """RTN or GPTQ through the sequential compression driver, on the shared calibration
        windows (RTN ignores the Hessians, but the driver still measures each layer's error)."""
        method_cfg = self.config.rtn_config(bits) if kind == "rtn" else self.config.gptq_config(bits)
        ccfg = self.config.compression_config(kind, asdict(method_cfg))
        windows = self.datamodule.calibration_windows()
        model = self.fresh_model().float()
        t = time.perf_counter()
        rep = compress_model(model, windows, ccfg, device=self.device, progress=self.config.progress)
        _sync(self.device)
        t_quant = time.perf_counter() - t
        bpw = bits_per_weight(model)
        # Saved as compressed (before evaluation casts the fp16 scales and zeros to eval.dtype); not timed.
        t_disk = time.perf_counter()
        disk = measure_bits_on_disk(model)
        t_disk = time.perf_counter() - t_disk
        errors = [layer.relative_error for layer in rep.layers]
        t_eval = time.perf_counter()
        ppl = self.evaluate(model)
        gs = method_cfg.group_size
        return {
            "method": f"{kind}_{bits}bit",
            "bits_per_weight": bpw["compressed_linears"],
            "bits_per_weight_whole_model": bpw["whole_model"],
            "bits_per_weight_on_disk": disk["compressed_linears"],
            "wikitext2_ppl": ppl,
            "seconds": time.perf_counter() - t - t_disk,
            "quantize_seconds": t_quant,
            "eval_seconds": time.perf_counter() - t_eval,
            "mean_relative_layer_error": sum(errors) / len(errors) if errors else None,
            "settings": asdict(method_cfg),
            "notes": f"{'asymmetric' if not method_cfg.symmetric else 'symmetric'} "
            f"{'per-row' if gs == -1 else f'group {gs}'}, fp16 scales and zeros",
        }

    def run_method(self, name: str) -> dict:
        if name not in METHODS:
            raise ValueError(f"unknown report method {name!r}; allowed: {list(METHODS)}")
        if name == "fp16":
            return self.run_fp16()
        if name in ("bnb_nf4", "bnb_fp4"):
            return self.run_bnb(name.removeprefix("bnb_"))
        if name == "qlora_nf4":
            return self.run_qlora()
        kind, bits = _SCALAR.match(name).groups()
        return self.run_scalar(kind, int(bits))
