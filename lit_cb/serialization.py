"""Saving and loading compressed models: safetensors tensors plus JSON, never pickle.

A model folder is a standard Hugging Face folder whose ``config.json`` carries
``quantization_config: {"quant_method": "lit_cb", "modules": {name: spec}}`` (one spec per replaced
module, so the structure can be rebuilt before the tensors are loaded; :mod:`lit_cb.hf_quantizer`),
plus ``model.safetensors``, the tokenizer files and ``compression.json`` (how the model was made).
Compressed module classes register a builder here (``type`` name -> callable from spec), so the
loader needs no knowledge of methods. Codes are written bit-packed (:mod:`lit_cb.bitpack`, format
version 2), and :func:`bits_per_weight_on_disk` measures what a folder's tensors take.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lit_cb.integrity import MANIFEST, check_values, verify_model_dir, write_manifest
from lit_cb.layers import CodebookFormat, CodebookLinear


def _build_codebook_linear(spec: dict) -> CodebookLinear:
    layer = CodebookLinear(CodebookFormat(**spec["format"]), dtype=_dtype(spec))
    if spec.get("low_rank", 0):
        layer.init_low_rank(spec["low_rank"], spec.get("low_rank_bits", 16))
    return layer


RUN_INFO = "compression.json"  # how the model was made (run config, perplexities); not needed to load it

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
            **({"low_rank_bits": module.low_rank_bits} if module.rank and module.low_rank_bits != 16 else {}),
        }
    if hasattr(module, "spec"):
        return module.spec()
    raise TypeError(f"{type(module).__name__} has no serialisable spec; give it a `spec()` method")


def build_module(spec: dict) -> nn.Module:
    """An empty module (tensors zero, shapes right) of the type and shape ``spec`` describes."""
    kind = spec.get("type")
    if kind not in _BUILDERS:
        from lit_cb.quant import registry

        registry.method_names()  # importing the method modules registers their module types
    if kind not in _BUILDERS:
        raise ValueError(f"unknown compressed module type {kind!r}; known: {sorted(_BUILDERS)}")
    try:
        return _BUILDERS[kind](spec)
    except (KeyError, TypeError) as err:  # a spec missing fields or with wrong ones (ValueError passes through)
        raise ValueError(f"malformed {kind} spec {spec!r}: {err!r}") from err


def compressed_specs(model: nn.Module) -> dict[str, dict]:
    return {
        name: module_spec(m)
        for name, m in model.named_modules()
        if isinstance(m, CodebookLinear) or (hasattr(m, "spec") and hasattr(m, "bits_per_weight"))
    }


def save_compressed(model: nn.Module, directory: str | Path, tokenizer=None, extra: dict | None = None) -> Path:
    """Write ``model`` as a lit_cb Hugging Face folder (``save_pretrained`` with ``quant_method: "lit_cb"``,
    see :mod:`lit_cb.hf_quantizer`) plus ``compression.json`` holding ``extra`` (how the model was made:
    run config, perplexities) and a model card, ``README.md`` (:mod:`lit_cb.model_card`); returns the
    folder."""
    from lit_cb.hf_quantizer import attached

    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"cannot save a model to {out}: it is a file")
    out.mkdir(parents=True, exist_ok=True)
    with attached(model):
        model.save_pretrained(out)
    (out / RUN_INFO).write_text(json.dumps(extra or {}, indent=1, default=str))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    from lit_cb.model_card import lit_cb_card, write_card

    write_card(out, lit_cb_card(out, json.loads((out / RUN_INFO).read_text())))  # from the files as written
    write_manifest(out)  # last: sha256 of every file and tensor, verified by load_compressed
    return out


def model_folder(path: str | Path) -> Path:
    """The model folder a user means by ``path``: a run folder (``outputs/<run>``, whose saved model is
    ``model/``) stands for its ``model/``; any other path is itself."""
    path = Path(path)
    return path / "model" if (path / "model" / "compression.json").is_file() else path


def read_quantization_config(directory: str | Path) -> dict | None:
    """``quantization_config`` of a model folder's config.json (None for a float model), with clear
    errors for a missing or unreadable config."""
    src = Path(directory)
    if not src.is_dir():
        raise FileNotFoundError(f"model folder {src} does not exist")
    path = src / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{src} is not a Hugging Face model folder: config.json is missing")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a {type(config).__name__}, not a JSON object")
    qc = config.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise ValueError(f"{path}: quantization_config must be an object, got {qc!r}")
    return qc


def load_compressed(directory: str | Path, device: str | torch.device = "cpu"):
    """Load a lit_cb folder; returns ``(model, tokenizer|None, meta)`` where ``meta`` is
    ``{"modules": specs, **compression.json}``.

    A thin wrapper over ``AutoModelForCausalLM.from_pretrained`` (the lit_cb quantizer does the work);
    folders written before the format became a transformers quantization method (specs in
    compression.json, config.json without quantization_config) still load.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_cb.hf_quantizer import QUANT_METHOD, register

    src = Path(directory)
    qc = read_quantization_config(src)
    try:
        info = json.loads((src / RUN_INFO).read_text()) if (src / RUN_INFO).is_file() else {}
    except ValueError as err:
        # A damaged compression.json: let the checksums name what changed, else name the file.
        if (src / MANIFEST).is_file():
            verify_model_dir(src)
        raise ValueError(f"{src / RUN_INFO} is not valid JSON ({err}): the file is damaged") from err
    # What the folder is comes first (a clear "wrong kind of folder"), then whether its files are intact.
    if qc is None and "modules" not in info:
        raise ValueError(
            f"{src} holds a float model (config.json has no quantization_config), not a lit_cb model; "
            "load it with lit_cb.models.load_model or transformers"
        )
    if qc is not None and qc.get("quant_method") != QUANT_METHOD:
        raise ValueError(
            f"{src} is quantized with quant_method={qc.get('quant_method')!r}; lit_cb loads {QUANT_METHOD!r} "
            "folders only (load others with transformers and their own package)"
        )
    if (src / MANIFEST).is_file():
        verify_model_dir(src)  # sizes and sha256 of every file and tensor against manifest.json
    else:
        warnings.warn(
            f"{src} has no {MANIFEST} (saved by save_pretrained, another tool or an older lit_cb): its files "
            "cannot be checked against checksums; lit_cb.serialization.save_compressed writes one",
            stacklevel=2,
        )
    if qc is None:
        model, meta = _load_legacy(src, info), info
    else:
        register()
        model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
        meta = {**info, "modules": model.config.quantization_config.modules}
    check_values(model, src)  # codes in [0, 2**B), finite codebooks and scales
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(src) if (src / "tokenizer_config.json").is_file() else None
    return model, tokenizer, meta


def _load_legacy(src: Path, meta: dict) -> nn.Module:
    """The pre-quantizer layout: specs and tied names in compression.json, config.json without
    quantization_config (which stock transformers loaded with random weights: re-save such folders)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from lit_cb.hf_quantizer import swap_in_compressed_modules

    if not (src / "model.safetensors").is_file():
        raise FileNotFoundError(f"{src} is not a lit_cb model directory: model.safetensors is missing")
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src))
    swap_in_compressed_modules(model, meta["modules"])
    tensors = load_file(str(src / "model.safetensors"))
    for name, source in meta.get("tied", {}).items():
        tensors[name] = tensors[source]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or missing:
        raise ValueError(f"{src}: state does not match the rebuilt model (missing {missing}, unexpected {unexpected})")
    return model


# -- what a folder holds on disk ----------------------------------------------------------------------
def _safetensors_files(src: Path) -> list[Path]:
    single, index = src / "model.safetensors", src / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        return [src / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    raise FileNotFoundError(f"{src} has neither model.safetensors nor model.safetensors.index.json")


def safetensors_tensor_sizes(src: str | Path) -> dict[str, tuple[int, int]]:
    """``{tensor name: (bytes, elements)}`` of a folder's safetensors files, read from their headers
    (the byte spans the file really holds, whatever dtype or packing wrote them)."""
    sizes: dict[str, tuple[int, int]] = {}
    for path in _safetensors_files(Path(src)):
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            elements = 1
            for size in info["shape"]:
                elements *= size
            sizes[name] = (end - start, elements)
    return sizes


def _spec_features(spec: dict) -> tuple[int, int]:
    shape = spec.get("format", spec)  # CodebookLinear nests its shape in "format", GroupQuantLinear does not
    return int(shape["in_features"]), int(shape["out_features"])


def bits_per_weight_on_disk(directory: str | Path) -> dict[str, float | int]:
    """Bits per weight that a saved lit_cb folder's tensors take on disk (the measured counterpart of
    :func:`lit_cb.compress.bits_per_weight`, the nominal count).

    ``compressed_linears``: bytes of every tensor a compressed module wrote (codes, codebooks, scales,
    zeros, g_idx, low-rank slot; not its bias nor its 6-byte marker, as the nominal count) x 8 over its
    in x out weights. ``whole_model``: bytes of every tensor in the files but the markers (embeddings,
    head, norms in whatever dtype they were saved; tied weights are written once) over the weights of
    the compressed linears plus the elements of every other tensor. Packed codes make the first equal
    the nominal figure up to each code stream's padding to a whole byte.
    """
    src = Path(directory)
    qc = read_quantization_config(src)
    if qc is None or not isinstance(qc.get("modules"), dict):
        raise ValueError(f"{src} holds no lit_cb quantization_config: there are no compressed linears to measure")
    sizes = safetensors_tensor_sizes(src)
    compressed_bytes = compressed_params = other_bytes = other_elements = 0
    owned: set[str] = set()
    for name, spec in qc["modules"].items():
        in_f, out_f = _spec_features(spec)
        compressed_params += in_f * out_f
        for key, (nbytes, _) in sizes.items():
            if key.startswith(f"{name}."):
                owned.add(key)
                if key[len(name) + 1 :] not in ("weight", "bias"):
                    compressed_bytes += nbytes
                elif key.endswith(".bias"):
                    other_bytes, other_elements = other_bytes + nbytes, other_elements + sizes[key][1]
    for key, (nbytes, elements) in sizes.items():
        if key not in owned:
            other_bytes, other_elements = other_bytes + nbytes, other_elements + elements
    if not compressed_params:
        raise ValueError(f"{src}: quantization_config lists no compressed module")
    return {
        "compressed_linears": 8 * compressed_bytes / compressed_params,
        "whole_model": 8 * (compressed_bytes + other_bytes) / (compressed_params + other_elements),
        "compressed_bytes": compressed_bytes,
        "compressed_params": compressed_params,
        "total_bytes": compressed_bytes + other_bytes,
        "total_params": compressed_params + other_elements,
    }


def measure_bits_on_disk(model: nn.Module) -> dict[str, float | int]:
    """:func:`bits_per_weight_on_disk` of ``model`` saved as it stands (``save_pretrained`` in the lit_cb
    format) to a temporary folder, for models that are measured but not kept (the comparison report)."""
    from lit_cb.hf_quantizer import attached

    with tempfile.TemporaryDirectory(prefix="lit_cb_bits_") as tmp, attached(model):
        model.save_pretrained(tmp)
        return bits_per_weight_on_disk(tmp)
