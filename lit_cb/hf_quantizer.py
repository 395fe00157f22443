"""lit_cb's format as a transformers quantization method: ``quant_method: "lit_cb"``.

A lit_cb model folder is a standard Hugging Face folder: ``config.json`` whose
``quantization_config`` is ``{"quant_method": "lit_cb", "format_version": 2, "modules": {name: spec}}``
(one spec per compressed module, from :func:`lit_cb.serialization.module_spec`), ``model.safetensors``
with each compressed module's own tensors (``codes``, ``codebooks``, ``scales``, ...), the tokenizer and
the generation config. After ``import lit_cb`` (which registers :class:`LitCbConfig` and
:class:`LitCbHfQuantizer` the first time transformers loads its quantizers),
``AutoModelForCausalLM.from_pretrained(folder)`` builds the float architecture on the meta device, swaps
the named modules for empty compressed ones and lets transformers load their tensors by name, as its
AQLM and HQQ integrations do.

Why a marker tensor: transformers only *warns* about a ``quant_method`` it does not know ("Unknown
quantization type ... we will skip the quantization"), then fills every missing ``*.weight`` with
random values. So each compressed module also stores ``<module>.weight`` as a 6-byte uint8 marker
(the bytes of ``lit_cb``): stock transformers sees a size mismatch against the ``[out, in]`` weight it
expects and raises, while this quantizer drops the marker on load.

Format version 2 stores codes bit-packed: a module whose spec says ``"codes_packed": true`` has its
``codes`` saved as the 1-D uint8 stream of :mod:`lit_cb.bitpack` (B bits per code) instead of one
uint8/int16 element per code; that is every codebook width but 8 and 16 and RTN/GPTQ codes of 2-4 bits,
so a file holds the bits/weight its format counts. Loading unpacks them into the in-memory layout the
kernels read. Version-1 folders (codes unpacked, no such key) load as before. A low-rank slot of a
module whose spec says ``"low_rank_bits": 8`` is saved as int8 ``low_rank_a``/``low_rank_b`` next to fp16
``low_rank_a_scale``/``low_rank_b_scale`` (:meth:`lit_cb.layers.CodebookLinear.round_low_rank`) and loads
back into the identical float slot.
"""

from __future__ import annotations

import contextlib
import importlib
import re
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from lit_cb.bitpack import needs_packing, pack_bits, packed_nbytes, unpack_bits
from lit_cb.layers import code_bits

QUANT_METHOD = "lit_cb"
FORMAT_VERSION = 2  # 1: codes one per uint8/int16 element; 2: codes of modules with "codes_packed" bit-packed
CODES_PACKED = "codes_packed"  # spec key: this module's codes are stored as a lit_cb.bitpack stream
_PACKED_LAYOUT = "_lit_cb_packed_codes"  # module attribute between the two loading hooks: (shape, dtype, bits)
MARKER = tuple(QUANT_METHOD.encode())  # uint8 values stored as each compressed module's ``weight``


class LitCbConfig(QuantizationConfigMixin):
    """``quantization_config`` of a lit_cb folder: the spec of every compressed module.

    Specs are what :func:`lit_cb.serialization.build_module` rebuilds an empty module from (the type,
    the format, the dtype, the low-rank slot's rank); the tensors then come from the safetensors file.
    """

    def __init__(
        self,
        modules: dict[str, dict] | None = None,
        format_version: int = FORMAT_VERSION,
        quant_method: str = QUANT_METHOD,
        **unknown: Any,
    ) -> None:
        if quant_method != QUANT_METHOD:
            raise ValueError(f"LitCbConfig got quant_method={quant_method!r}; it describes {QUANT_METHOD!r} only")
        if unknown:
            raise ValueError(
                f"quantization_config (quant_method {QUANT_METHOD!r}) has unknown keys {sorted(unknown)}; "
                "allowed: format_version, modules, quant_method"
            )
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.modules = {} if modules is None else modules
        self.post_init()

    def post_init(self) -> None:
        """Reject what cannot be loaded before any model is built."""
        if not isinstance(self.format_version, int) or not 1 <= self.format_version <= FORMAT_VERSION:
            raise ValueError(
                f"quantization_config.format_version={self.format_version!r}: this lit_cb reads format versions "
                f"1..{FORMAT_VERSION} (a newer lit_cb wrote the folder?)"
            )
        if not isinstance(self.modules, dict):
            raise ValueError(
                f"quantization_config.modules must map module names to specs, got {type(self.modules).__name__}"
            )
        for name, spec in self.modules.items():
            if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
                raise ValueError(f"quantization_config.modules[{name!r}] is not a spec with a 'type': {spec!r}")
            if spec.get(CODES_PACKED) and self.format_version < 2:
                raise ValueError(
                    f"quantization_config.modules[{name!r}] says {CODES_PACKED} but format_version="
                    f"{self.format_version}; packed codes exist from format version 2"
                )

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "format_version": self.format_version, "modules": self.modules}


def _marker() -> torch.Tensor:
    return torch.tensor(MARKER, dtype=torch.uint8)


def _features(module: nn.Module) -> tuple[int | None, int | None]:
    return getattr(module, "in_features", None), getattr(module, "out_features", None)


def _stores_packed(module: nn.Module) -> bool:
    bits = code_bits(module)
    return bits is not None and needs_packing(bits)


def expect_packed_codes(module: nn.Module, name: str) -> None:
    """Give an empty module a ``codes`` buffer shaped like the packed stream, so the checkpoint's tensor
    loads into it by name; :func:`unpack_loaded_codes` restores the in-memory layout afterwards."""
    if not _stores_packed(module):
        raise ValueError(
            f"quantization_config.modules[{name!r}] says {CODES_PACKED}, but its module stores "
            f"{code_bits(module)}-bit codes, which are never packed"
        )
    codes, bits = module.codes, code_bits(module)
    setattr(module, _PACKED_LAYOUT, (tuple(codes.shape), codes.dtype, bits))
    module.codes = torch.empty(packed_nbytes(codes.numel(), bits), dtype=torch.uint8, device=codes.device)


def unpack_loaded_codes(model: nn.Module) -> None:
    """Unpack the codes of every module :func:`expect_packed_codes` prepared (on the device they loaded to)."""
    for module in model.modules():
        layout = module.__dict__.pop(_PACKED_LAYOUT, None)
        if layout is None:
            continue
        shape, dtype, bits = layout
        count = 1
        for size in shape:
            count *= size
        module.codes = unpack_bits(module.codes, bits, count).to(dtype).reshape(shape)


_INT8_SLOT = "_lit_cb_int8_low_rank"  # module attribute between the two loading hooks: the slot's float dtype


def _stores_int8_slot(module: nn.Module) -> bool:
    return getattr(module, "rank", 0) > 0 and getattr(module, "low_rank_bits", 16) == 8


def expect_int8_low_rank(module: nn.Module) -> None:
    """Give an empty module int8 low-rank factors, so the checkpoint's int8 tensors load into them by name;
    :func:`dequantize_loaded_low_rank` turns them into the float slot afterwards."""
    a, b = module.low_rank_a, module.low_rank_b
    setattr(module, _INT8_SLOT, a.dtype)
    module.low_rank_a = nn.Parameter(torch.empty(a.shape, dtype=torch.int8, device=a.device), requires_grad=False)
    module.low_rank_b = nn.Parameter(torch.empty(b.shape, dtype=torch.int8, device=b.device), requires_grad=False)


def dequantize_loaded_low_rank(model: nn.Module) -> None:
    """The float slot (int8 values times their scales) of every module :func:`expect_int8_low_rank` prepared."""
    from lit_cb.layers import dequantize_low_rank

    for module in model.modules():
        dtype = module.__dict__.pop(_INT8_SLOT, None)
        if dtype is None:
            continue
        a, b = dequantize_low_rank(
            module.low_rank_a, module.low_rank_b, module.low_rank_a_scale, module.low_rank_b_scale
        )
        module.low_rank_a = nn.Parameter(a.to(dtype), requires_grad=False)
        module.low_rank_b = nn.Parameter(b.to(dtype), requires_grad=False)


def swap_in_compressed_modules(model: nn.Module, modules: dict[str, dict]) -> None:
    """Replace each named module of ``model`` by an empty compressed module built from its spec (on
    whatever device the surrounding context sets, the meta device during ``from_pretrained``)."""
    from lit_cb.serialization import build_module

    for name, spec in modules.items():
        try:
            old = model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(
                f"quantization_config.modules names {name!r}, which {type(model).__name__} does not have; "
                "is config.json's architecture the one the model was compressed from?"
            ) from err
        new = build_module(spec)
        if None not in _features(old) and _features(old) != _features(new):
            raise ValueError(
                f"quantization_config.modules[{name!r}] is {_features(new)} (in, out) but the model's {name} is "
                f"{_features(old)}"
            )
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)


class LitCbHfQuantizer(HfQuantizer):
    """Loads and saves pre-compressed lit_cb models through ``from_pretrained`` / ``save_pretrained``.

    Compression itself needs calibration data (``lit_cb.compress``), so ``requires_calibration``: passing a
    ``LitCbConfig`` to ``from_pretrained`` on a float checkpoint is refused by transformers.
    """

    requires_calibration = True
    quantization_config: LitCbConfig

    def validate_environment(self, *args, **kwargs) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("lit_cb models cannot be offloaded to disk; use a device_map without 'disk'")

    def _process_model_before_weight_loading(self, model, **kwargs) -> None:
        swap_in_compressed_modules(model, self.quantization_config.modules)
        for name, spec in self.quantization_config.modules.items():
            if spec.get(CODES_PACKED):
                expect_packed_codes(model.get_submodule(name), name)
            if _stores_int8_slot(model.get_submodule(name)):
                expect_int8_low_rank(model.get_submodule(name))
        # The per-module markers are for loaders that do not know lit_cb; here they are expected and dropped.
        patterns = {rf"^{re.escape(name)}\.weight$" for name in self.quantization_config.modules}
        model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | patterns

    def _process_model_after_weight_loading(self, model, **kwargs):
        unpack_loaded_codes(model)
        dequantize_loaded_low_rank(model)
        return model

    def get_state_dict_and_metadata(self, model):
        """The state dict with a marker per compressed module and bit-packed codes, and the current specs
        in the config.

        Specs are refreshed here (``save_pretrained`` writes config.json afterwards) because a merged LoRA
        changes the low-rank slot of compressed modules after loading; the format version becomes the
        current one, since what is written is in the current format.
        """
        from lit_cb.serialization import compressed_specs

        specs = compressed_specs(model)
        state = model.state_dict()
        for name in specs:
            key = f"{name}.weight"
            if key in state:
                raise ValueError(f"{name} is compressed but also has a 'weight' tensor in its state dict")
            state[key] = _marker()
            module = model.get_submodule(name)
            if _stores_packed(module):
                state[f"{name}.codes"] = pack_bits(module.codes, code_bits(module))
                specs[name] = {**specs[name], CODES_PACKED: True}
            if _stores_int8_slot(module):  # the spec says low_rank_bits: 8 (serialization.module_spec)
                state[f"{name}.low_rank_a"], state[f"{name}.low_rank_b"] = module.low_rank_int8()
        self.quantization_config.modules = specs
        self.quantization_config.format_version = FORMAT_VERSION
        return state, {"lit_cb_format_version": str(FORMAT_VERSION)}

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # peft LoRA through lit_cb.recovery's dispatcher; codebooks/scales are Parameters

    @property
    def is_qat_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True  # the Triton kernels are torch custom ops with fake (meta) implementations


def register() -> None:
    """Register the config and quantizer with transformers (idempotent)."""
    auto = importlib.import_module("transformers.quantizers.auto")  # may be mid-import: see lit_cb/__init__.py
    if QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.register_quantization_config(QUANT_METHOD)(LitCbConfig)
    if QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        auto.register_quantizer(QUANT_METHOD)(LitCbHfQuantizer)


def attach(model: nn.Module) -> LitCbHfQuantizer:
    """Mark an in-process compressed model as a lit_cb-quantized transformers model (what
    ``from_pretrained`` does for a loaded one), so that ``model.save_pretrained`` writes the lit_cb format."""
    from lit_cb.serialization import compressed_specs

    register()
    config = LitCbConfig(modules=compressed_specs(model))
    quantizer = LitCbHfQuantizer(config, pre_quantized=True)
    model.config.quantization_config = config
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    return quantizer


@contextlib.contextmanager
def attached(model: nn.Module) -> Iterator[LitCbHfQuantizer]:
    """:func:`attach` for the duration of a block, then the model's previous quantization state back
    (a quantized transformers model refuses ``.half()``/``.float()``, which callers may still need)."""
    missing = object()
    names = ("hf_quantizer", "is_quantized", "quantization_method")
    saved = {n: model.__dict__.get(n, missing) for n in names}
    saved_config = model.config.__dict__.get("quantization_config", missing)
    try:
        yield attach(model)
    finally:
        for n, value in saved.items():
            if value is missing:
                model.__dict__.pop(n, None)
            else:
                setattr(model, n, value)
        if saved_config is missing:
            model.config.__dict__.pop("quantization_config", None)
        else:
            model.config.quantization_config = saved_config


# Imported directly (before the registry hook of lit_cb/__init__.py could run register()): register now.
if "transformers.quantizers.auto" in sys.modules:
    register()
