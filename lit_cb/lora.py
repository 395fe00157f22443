"""peft LoRA on compressed layers: the dispatcher, and low-rank slots as a portable peft adapter.

A :class:`~lit_cb.layers.CodebookLinear` is no ``nn.Linear``, so peft reaches it through its custom-module
dispatcher (:func:`register_dispatcher`), with :class:`CodebookLoraLinear` as the wrapper. Merging moves
an adapter into the layer's fp16 low-rank slot, since codebooks cannot absorb it.

Formats that have no low-rank slot (AQLM's ``QuantizedLinear``) carry the slots as a standard peft LoRA
adapter instead: :func:`save_slots_as_adapter` writes ``adapter_config.json`` and
``adapter_model.safetensors`` (``lora_A = low_rank_a``, ``lora_B = low_rank_b``, ``lora_alpha = r`` so
peft's scaling is 1, exact module names as targets, per-layer ranks in ``rank_pattern``), which
``PeftModel.from_pretrained(base, folder)`` or transformers' ``model.load_adapter(folder)`` put back on
the base model: the same function, ``base(x) + B (A x)``. :func:`merge_adapter_into_slots` reads such an
adapter (or any LoRA adapter of those layers) back into the slots, through peft itself.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import nn

from lit_cb.layers import CodebookLinear, CompressedLinear
from lit_cb.trellis import TrellisLinear

ADAPTER_SUBDIR = "lora"  # where a model folder without low-rank slots (AQLM) keeps them as an adapter
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# What an adapter must say to be B @ A and nothing else (a low-rank slot holds just that).
PLAIN_LORA = {"use_dora": False, "lora_bias": False, "bias": "none", "modules_to_save": None}


class CodebookLoraLinear(nn.Module, LoraLayer):
    """peft LoRA around a compressed linear (:class:`CodebookLinear`, :class:`TrellisLinear`), registered
    with peft's custom-module dispatcher. Neither format can absorb an adapter, so merging moves it into
    the layer's low-rank correction slot (``merge_and_unload`` then yields plain compressed layers)."""

    def __init__(self, base_layer: CompressedLinear, adapter_name: str, config: LoraConfig, r: int = 0, **kwargs):
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=kwargs.get("lora_alpha", 1), config=config)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        for name in adapter_names or self.active_adapters:
            if name in self.lora_A and name not in self.merged_adapters:
                a = self.lora_A[name].weight  # [r, in]
                b = self.lora_B[name].weight * self.scaling[name]  # [out, r]
                self.get_base_layer().add_low_rank(a, b)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        raise NotImplementedError("a LoRA merged into a CodebookLinear's low-rank slot cannot be unmerged")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.disable_adapters or self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            a, b = self.lora_A[name], self.lora_B[name]
            out = b(a(self.lora_dropout[name](x.to(a.weight.dtype))))
            result = result + (out * self.scaling[name]).to(result.dtype)
        return result


def register_dispatcher(config: LoraConfig) -> LoraConfig:
    """Let ``config``'s LoRA wrap CodebookLinears and TrellisLinears (with :class:`CodebookLoraLinear`, which
    only needs the layer's low-rank slot); returns it."""
    config._register_custom_module({CodebookLinear: CodebookLoraLinear, TrellisLinear: CodebookLoraLinear})
    return config


def low_rank_slots(model: nn.Module) -> dict[str, CompressedLinear]:
    """The compressed linears of ``model`` whose low-rank slot holds something, by full name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, CompressedLinear) and m.rank}


def save_slots_as_adapter(model: nn.Module, out_dir: str | Path) -> list[str]:
    """Write the low-rank slots of ``model`` as a peft LoRA adapter in ``out_dir`` (made if missing);
    returns the layers it holds (none: nothing is written). See the module docstring."""
    slots = low_rank_slots(model)
    if not slots:
        return []
    ranks = {name: layer.rank for name, layer in slots.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    # alpha = rank everywhere: peft's scaling alpha / r is then 1, so B @ A is the slot as it is
    pattern = {re.escape(name): rank for name, rank in ranks.items() if rank != r}
    config = LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=sorted(slots),
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        inference_mode=True,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    tensors = {}
    for name, layer in slots.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = layer.low_rank_a.detach().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = layer.low_rank_b.detach().cpu().contiguous()
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return sorted(slots)


def _peft_model(model: nn.Module, adapter_dir: str | Path) -> PeftModel:
    """``model`` wrapped with the adapter of ``adapter_dir``, CodebookLinears included (the dispatcher)."""
    config = register_dispatcher(LoraConfig.from_pretrained(str(adapter_dir)))
    with warnings.catch_warnings():
        # peft warns about any base layer it does not know, even one the dispatcher handles
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        return PeftModel.from_pretrained(model, str(adapter_dir), config=config)


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def with_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """``model`` with the LoRA adapter of ``adapter_dir`` put on, unmerged (AQLM's layers cannot absorb
    one): the transformers model itself, its adapted linears wrapped in place by peft, so everything
    that calls the model (generate, a static-cache decode loop) sees the adapted function."""
    return _peft_model(model, adapter_dir).get_base_model().eval()


def merge_adapter_into_slots(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """``model`` with the LoRA adapter in ``adapter_dir`` merged: into the low-rank slots of its
    CodebookLinears (and into the weights of dense linears, as peft merges). Refuses an adapter that
    is not a plain LoRA (DoRA, trained biases or extra modules) before touching the model."""
    src = Path(adapter_dir)
    raw = json.loads((src / ADAPTER_CONFIG).read_text())
    if raw.get("peft_type") != "LORA":
        raise ValueError(f"{src}: peft_type {raw.get('peft_type')!r}; only LoRA adapters merge into low-rank slots")
    found = {
        "use_dora": bool(raw.get("use_dora")),
        "lora_bias": bool(raw.get("lora_bias")),
        "bias": raw.get("bias", "none"),
        "modules_to_save": raw.get("modules_to_save") or None,  # [] and None alike: nothing else trained
    }
    for key, plain in PLAIN_LORA.items():
        if found[key] != plain:
            raise ValueError(f"{src}: {key}={found[key]!r}; a low-rank slot holds a plain LoRA ({key}={plain!r})")
    return _peft_model(model, src).merge_and_unload()
