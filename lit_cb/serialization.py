"""Saving and loading compressed models: safetensors tensors plus JSON, never pickle.

A run directory holds ``config.json`` (the Hugging Face model config), ``compression.json``
(one spec per replaced module, so the structure can be rebuilt before the tensors are loaded),
``model.safetensors`` and the tokenizer files. Compressed module classes register a builder
here (``type`` name -> class with ``from_spec``), so the loader needs no knowledge of methods.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lit_cb.integrity import check_values, verify_model_dir, write_manifest
from lit_cb.layers import CodebookFormat, CodebookLinear


def _build_codebook_linear(spec: dict) -> CodebookLinear:
    layer = CodebookLinear(CodebookFormat(**spec["format"]), dtype=_dtype(spec))
    if spec.get("low_rank", 0):
        layer.init_low_rank(spec["low_rank"])
    return layer


_BUILDERS: dict[str, Callable[[dict], nn.Module]] = {"CodebookLinear": _build_codebook_linear}


def _dtype(spec: dict) -> torch.dtype:
    return getattr(torch, spec.get("dtype", "float16"))


def register_module_type(type_name: str, builder: Callable[[dict], nn.Module]) -> None:
    """Let :func:`build_module` rebuild modules of ``type_name`` from their spec."""
    _BUILDERS[type_name] = builder


def module_spec(module: nn.Module) -> dict:
    """JSON-serialisable description from which :func:`build_module` rebuilds an empty module."""
    if isinstance(module, CodebookLinear):
        return {
            "type": "CodebookLinear",
            "format": module.fmt.to_dict(),
            "dtype": str(module.codebooks.dtype).removeprefix("torch."),
            "low_rank": module.rank,
        }
    if hasattr(module, "spec"):
        return module.spec()
    raise TypeError(f"{type(module).__name__} has no serialisable spec; give it a `spec()` method")


def build_module(spec: dict) -> nn.Module:
    kind = spec.get("type")
    if kind not in _BUILDERS:
        from lit_cb.quant import registry

        registry.method_names()  # importing the method modules registers their module types
    if kind not in _BUILDERS:
        raise ValueError(f"unknown compressed module type {kind!r}; known: {sorted(_BUILDERS)}")
    return _BUILDERS[kind](spec)


def compressed_specs(model: nn.Module) -> dict[str, dict]:
    return {
        name: module_spec(m)
        for name, m in model.named_modules()
        if isinstance(m, CodebookLinear) or (hasattr(m, "spec") and hasattr(m, "bits_per_weight"))
    }


def save_compressed(model: nn.Module, directory: str | Path, tokenizer=None, extra: dict | None = None) -> Path:
    """Write the model (compressed modules included) to ``directory``; returns it."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    # safetensors refuses aliased tensors: keep one name per storage (tied embeddings).
    seen: dict[int, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    for name, t in state.items():
        key = t.data_ptr() if t.numel() else id(t)
        if key in seen and t.numel():
            tied[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().cpu().contiguous()
    save_file(tensors, str(out / "model.safetensors"))
    model.config.to_json_file(str(out / "config.json"))
    meta = {"modules": compressed_specs(model), "tied": tied, **(extra or {})}
    (out / "compression.json").write_text(json.dumps(meta, indent=1))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    write_manifest(out)  # last: sha256 of every file and tensor, verified by load_compressed
    return out


def load_compressed(directory: str | Path, device: str | torch.device = "cpu"):
    """Rebuild a model written by :func:`save_compressed`; returns ``(model, tokenizer|None, meta)``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = Path(directory)
    for required in ("config.json", "compression.json", "model.safetensors"):
        if not (src / required).is_file():
            raise FileNotFoundError(f"{src} is not a lit_cb model directory: {required} is missing")
    verify_model_dir(src)  # sizes and sha256 of every file and tensor against manifest.json
    meta = json.loads((src / "compression.json").read_text())
    config = AutoConfig.from_pretrained(src)
    model = AutoModelForCausalLM.from_config(config)
    for name, spec in meta["modules"].items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, build_module(spec))
    tensors = load_file(str(src / "model.safetensors"))
    for name, source in meta.get("tied", {}).items():
        tensors[name] = tensors[source]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or missing:
        raise ValueError(f"{src}: state does not match the rebuilt model (missing {missing}, unexpected {unexpected})")
    check_values(model, src)  # codes in [0, 2**B), finite codebooks and scales
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(src) if (src / "tokenizer_config.json").is_file() else None
    return model, tokenizer, meta
