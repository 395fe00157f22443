"""Export lit_cb models to the published AQLM format and import AQLM models into lit_cb.

An AQLM folder is what ``transformers`` loads with the ``aqlm`` package (``aqlm.QuantizedLinear``):
``config.json`` whose ``quantization_config`` is ``{"quant_method": "aqlm", "in_group_size",
"out_group_size", "num_codebooks", "nbits_per_codebook", "linear_weights_not_to_quantize"}`` plus
safetensors with, for every quantized linear ``X``:

* ``X.codes``     ``[out/og, in/g, M]``  int8 (B <= 8) or int16 (B <= 16); a code ``c >= 2**(B-1)``
  is stored as ``c - 2**B`` (``aqlm.utils.pack_int_data``) and read back modulo ``2**B``
* ``X.codebooks`` ``[M, 2**B, og, g]``  (float16 in published models)
* ``X.scales``    ``[out/og, 1, 1, 1]``
* ``X.bias``      ``[out]`` when the architecture's linear has one

That is lit_cb's :class:`~lit_cb.layers.CodebookLinear` layout except for the code dtype (lit_cb
keeps uint8 for B <= 8 and wraps int16 only above 2**15), so conversion re-encodes codes and copies
everything else bit for bit. ``QuantizedLinear`` has no low-rank slot, so the slots that merged LoRA
adapters landed in (``recovery.lora_on_compressed``) go beside the checkpoint as a standard peft LoRA
adapter, ``<folder>/lora/`` (:mod:`lit_cb.lora`): ``PeftModel.from_pretrained(model, folder / "lora")``
on the AQLM model gives the lit_cb model's function, and an import merges ``lora/`` back into the slots.
What AQLM cannot express is refused, naming the layer: the quantization config is global (one format
for every quantized linear), only ``nn.Linear`` modules of the architecture are replaced and their bias
follows the architecture.
Dense linears are listed in ``linear_weights_not_to_quantize`` twice: as ``name.weight`` (the
published convention, matched by transformers 4.x) and as ``name`` (transformers >= 5 matches
module names).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lit_cb.interop.outdir import check_new_output_dir, new_output_dir
from lit_cb.layers import CodebookFormat, CodebookLinear, pack_codes, unpack_codes
from lit_cb.lora import ADAPTER_SUBDIR, is_adapter_dir, merge_adapter_into_slots, save_slots_as_adapter
from lit_cb.model_card import aqlm_card, write_card
from lit_cb.serialization import load_compressed, save_compressed

FORMAT_FIELDS = ("in_group_size", "out_group_size", "num_codebooks", "nbits_per_codebook")
QUANT_METHOD = "aqlm"
ADAPTER_DIR = ADAPTER_SUBDIR  # the low-rank slots as a peft LoRA adapter, inside the AQLM folder
LOW_RANK_PARTS = ("low_rank_a", "low_rank_b", "low_rank_a_scale", "low_rank_b_scale")  # all go to the adapter


class AQLMFormatError(ValueError):
    """A model or folder that the AQLM format cannot express (or that is not AQLM)."""


# --------------------------------------------------------------------------------------------
# Codes


def aqlm_code_dtype(nbits: int) -> torch.dtype:
    """The code dtype ``aqlm.QuantizedLinear`` allocates (``aqlm.utils.get_int_dtype``)."""
    return torch.int8 if nbits <= 8 else torch.int16


def codes_to_aqlm(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """lit_cb stored codes -> AQLM stored codes (signed, wrapped at ``2**(nbits-1)``)."""
    idx = unpack_codes(codes, nbits)
    idx = torch.where(idx >= 2 ** (nbits - 1), idx - 2**nbits, idx)
    return idx.to(aqlm_code_dtype(nbits))


def codes_from_aqlm(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """AQLM stored codes (any integer dtype, read modulo ``2**nbits`` as aqlm does) -> lit_cb's."""
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise AQLMFormatError(f"codes have dtype {codes.dtype}; AQLM codes are integers")
    return pack_codes(codes.to(torch.int64) % (2**nbits), nbits)


# --------------------------------------------------------------------------------------------
# Export


def _reference_model(config) -> nn.Module:
    """The architecture as transformers builds it (on the meta device: no memory, no init)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def aqlm_quantization_config(model: nn.Module) -> dict:
    """The ``quantization_config`` for ``model``; raises :class:`AQLMFormatError` naming the first
    layer AQLM cannot express and why."""
    reference = dict(_reference_model(model.config).named_modules())
    fmt: dict | None = None
    first = ""
    dense: list[str] = []
    for name, module in model.named_modules():
        if hasattr(module, "lora_A"):
            raise AQLMFormatError(f"layer {name}: has an unmerged LoRA adapter; merge it first (merge_and_unload)")
        if isinstance(module, CodebookLinear):
            ref = reference.get(name)
            if not isinstance(ref, nn.Linear):
                kind = "no module" if ref is None else type(ref).__name__
                raise AQLMFormatError(
                    f"layer {name}: the architecture has {kind} there, not nn.Linear; "
                    "AQLM replaces only nn.Linear modules"
                )
            has_bias = module.bias is not None
            if has_bias != (ref.bias is not None):
                raise AQLMFormatError(
                    f"layer {name}: bias={has_bias} but the architecture's linear has bias={ref.bias is not None}; "
                    "AQLM takes the bias from the architecture"
                )
            if (ref.in_features, ref.out_features) != (module.in_features, module.out_features):
                raise AQLMFormatError(
                    f"layer {name}: shape [{module.out_features}, {module.in_features}] differs from the "
                    f"architecture's [{ref.out_features}, {ref.in_features}]"
                )
            this = {k: getattr(module.fmt, k) for k in FORMAT_FIELDS}
            if fmt is None:
                fmt, first = this, name
            elif this != fmt:
                raise AQLMFormatError(
                    f"layer {name}: format {this} differs from {first}'s {fmt}; AQLM's quantization_config "
                    "holds one format for the whole model"
                )
        elif isinstance(module, nn.Linear):
            dense.append(name)
        elif hasattr(module, "spec") and hasattr(module, "bits_per_weight"):
            raise AQLMFormatError(
                f"layer {name}: is a {type(module).__name__}, not an additive-codebook layer; "
                "AQLM stores only CodebookLinear layers (methods codebook / aqlm)"
            )
    if fmt is None:
        raise AQLMFormatError("the model has no CodebookLinear layer; nothing to export in the AQLM format")
    not_quantized = []
    for name in dense:
        not_quantized += [f"{name}.weight", name]
    return {"quant_method": QUANT_METHOD, **fmt, "linear_weights_not_to_quantize": not_quantized}


def aqlm_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of the AQLM checkpoint: the model's state with codes re-encoded and without the
    low-rank slots (they go to the adapter). A tensor that aliases an earlier one (tied embeddings) is
    left out when the config ties them (transformers re-ties on load) and written as a copy otherwise."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    compressed = {name: m for name, m in model.named_modules() if isinstance(m, CodebookLinear)}
    nbits = {f"{name}.codes": m.fmt.nbits_per_codebook for name, m in compressed.items()}
    slots = {f"{name}.{part}" for name in compressed for part in LOW_RANK_PARTS}
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for key, t in model.state_dict().items():
        if key in slots:
            continue
        alias = (t.device, t.data_ptr(), tuple(t.shape), t.dtype) if t.numel() else None  # before .cpu() copies
        t = t.detach().cpu()
        if alias is not None and alias in seen:
            if tied:
                continue
            t = t.clone()
        seen.add(alias)
        out[key] = codes_to_aqlm(t, nbits[key]) if key in nbits else t.contiguous()
    return out


def save_aqlm(model: nn.Module, out_dir: str | Path, tokenizer=None) -> Path:
    """Write ``model`` (with CodebookLinear layers) as an AQLM folder, plus ``lora/`` when low-rank
    slots hold something; ``out_dir`` must be new or empty. Everything is checked before anything is
    written, and the folder appears only once complete."""
    quant_config = aqlm_quantization_config(model)
    tensors = aqlm_state_dict(model)
    config = model.config.to_dict()
    config["quantization_config"] = quant_config
    out = Path(out_dir)
    with new_output_dir(out) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        adapted = save_slots_as_adapter(model, tmp / ADAPTER_DIR)
        write_card(tmp, aqlm_card(out, quant_config, adapted))
    return out


def export_aqlm(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Convert the lit_cb model folder ``model_dir`` into the AQLM folder ``out_dir`` (new or empty)."""
    check_new_output_dir(out_dir)  # refuse before loading anything
    model, tokenizer, _ = load_compressed(model_dir)
    return save_aqlm(model, out_dir, tokenizer)


# --------------------------------------------------------------------------------------------
# Import


def is_aqlm_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a config.json with ``quantization_config.quant_method == "aqlm"``."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        quant = json.loads(cfg.read_text()).get("quantization_config") or {}
    except (json.JSONDecodeError, AttributeError):
        return False
    return isinstance(quant, dict) and quant.get("quant_method") == QUANT_METHOD


def read_aqlm_quantization_config(aqlm_dir: str | Path) -> dict:
    """The validated ``quantization_config`` of an AQLM folder."""
    src = Path(aqlm_dir)
    if not is_aqlm_dir(src):
        raise AQLMFormatError(
            f"{src} is not an AQLM model folder: config.json with quantization_config.quant_method 'aqlm' is missing"
        )
    quant = json.loads((src / "config.json").read_text())["quantization_config"]
    for key in FORMAT_FIELDS:
        value = quant.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise AQLMFormatError(f"{src}: quantization_config.{key}={value!r}; an integer is required")
    return quant


def read_safetensors_folder(src: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or of the shards named by ``model.safetensors.index.json``."""
    single, index = src / "model.safetensors", src / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            tensors.update(load_file(str(src / shard)))
        return tensors
    raise FileNotFoundError(f"{src} has neither model.safetensors nor model.safetensors.index.json")


def _dense_dtype(tensors: dict[str, torch.Tensor], quantized: list[str]) -> torch.dtype:
    skip = {f"{n}.{p}" for n in quantized for p in ("codes", "codebooks", "scales", "bias")}
    counts = Counter(t.dtype for k, t in tensors.items() if k not in skip and t.is_floating_point())
    return counts.most_common(1)[0][0] if counts else torch.float32


def import_aqlm(aqlm_dir: str | Path):
    """Load an AQLM folder as a transformers model whose quantized linears are lit_cb
    CodebookLinears holding the same tensors; returns ``(model, tokenizer | None)``. A LoRA adapter in
    ``<aqlm_dir>/lora/`` is merged into the low-rank slots of the layers it adapts.

    Every tensor keeps the dtype it has in the folder (a float16 AQLM model stays float16), so a
    re-export writes identical tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = Path(aqlm_dir)
    quant = read_aqlm_quantization_config(src)
    tensors = read_safetensors_folder(src)
    config = AutoConfig.from_pretrained(src)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # build the plain architecture, not transformers' AQLM one
    quantized = sorted(k.removesuffix(".codes") for k in tensors if k.endswith(".codes"))
    if not quantized:
        raise AQLMFormatError(f"{src}: no '<layer>.codes' tensor in the checkpoint; not an AQLM model")
    dense_dtype = _dense_dtype(tensors, quantized)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dense_dtype)  # build in the checkpoint's dtype: half the memory of float32
    try:
        model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    nbits = quant["nbits_per_codebook"]
    for name in quantized:
        try:
            ref = model.get_submodule(name)
        except AttributeError:
            ref = None
        if not isinstance(ref, nn.Linear):
            kind = "no module" if ref is None else type(ref).__name__
            raise AQLMFormatError(f"layer {name}: has AQLM codes but the architecture has {kind} there, not nn.Linear")
        try:
            fmt = CodebookFormat(
                in_features=ref.in_features,
                out_features=ref.out_features,
                bias=f"{name}.bias" in tensors,
                **{k: quant[k] for k in FORMAT_FIELDS},
            )
        except ValueError as err:
            raise AQLMFormatError(f"layer {name}: lit_cb cannot hold this AQLM format: {err}") from err
        codebooks = tensors[f"{name}.codebooks"] if f"{name}.codebooks" in tensors else None
        if codebooks is None or f"{name}.scales" not in tensors:
            raise AQLMFormatError(f"layer {name}: the checkpoint has codes but no codebooks or scales")
        layer = CodebookLinear(fmt, dtype=codebooks.dtype)
        for part, expected in (
            ("codes", layer.codes.shape),
            ("codebooks", layer.codebooks.shape),
            ("scales", layer.scales.shape),
        ):
            got = tensors[f"{name}.{part}"].shape
            if got != expected:
                raise AQLMFormatError(
                    f"layer {name}: {part} have shape {list(got)}, expected {list(expected)} "
                    f"for {fmt.num_codebooks}x{nbits} g{fmt.in_group_size} og{fmt.out_group_size}"
                )
        tensors[f"{name}.codes"] = codes_from_aqlm(tensors[f"{name}.codes"], nbits)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()  # assign=True replaced the embedding: tie the head to it again, as transformers does
    missing = [k for k in missing if not _aliases_loaded(model, k, tensors)]
    if missing or unexpected:
        raise AQLMFormatError(
            f"{src}: checkpoint does not match the architecture (missing {missing}, unexpected {unexpected})"
        )
    if is_adapter_dir(src / ADAPTER_DIR):
        model = merge_adapter_into_slots(model, src / ADAPTER_DIR)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(src) if (src / "tokenizer_config.json").is_file() else None
    return model, tokenizer


def _aliases_loaded(model: nn.Module, key: str, tensors: dict[str, torch.Tensor]) -> bool:
    """Whether state ``key`` (absent from the checkpoint) shares storage with a loaded tensor."""
    state = model.state_dict()
    ptr = state[key].untyped_storage().data_ptr()
    return any(state[k].untyped_storage().data_ptr() == ptr for k in tensors if k in state)


def import_to_lit_cb(aqlm_dir: str | Path, out_dir: str | Path) -> Path:
    """Convert the AQLM folder ``aqlm_dir`` into the lit_cb model folder ``out_dir`` (new or empty)."""
    check_new_output_dir(out_dir)
    quant = read_aqlm_quantization_config(aqlm_dir)
    model, tokenizer = import_aqlm(aqlm_dir)
    out = Path(out_dir)
    with new_output_dir(out) as tmp:
        save_compressed(model, tmp, tokenizer, extra={"source": {"format": QUANT_METHOD, "quantization_config": quant}})
    return out
