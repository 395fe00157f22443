"""bitsandbytes 4-bit (NF4 / FP4) baseline: swap a model's linears for real ``bnb.nn.Linear4bit``.

This is the comparison point users actually deploy (``load_in_4bit`` / QLoRA), so the swap uses
bitsandbytes' own layer and quantizer rather than a re-implementation: the numbers in the report
are bitsandbytes' numbers. bitsandbytes >= 0.45 quantizes and runs on CPU too; the weights are
quantized explicitly on the device they already live on (``Params4bit._quantize``), so the swap
does not depend on a later ``.to("cuda")`` to trigger quantization.

Bits/weight (:func:`bnb_bits_per_weight`) counts what the quantized layer stores per weight:
4 bits of code plus one float32 absmax per ``blocksize`` weights (4 + 32/64 = 4.5 at the default
blocksize 64). With double quantization (``compress_statistics=True``, off by default to match the
reference protocol) the absmax is stored as 8-bit codes, plus one float32 absmax and one float32
offset per 256 blocks: 4 + 8/64 + 64/(64·256). The shared 16-entry NF4/FP4 lookup table (and the
256-entry table of the double quantization) are per-layer constants and not counted; nor is the
bias, as for the other methods.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from lit_cb.configs.bnb import (  # noqa: F401 (re-exported: the config lives torch-free)
    BLOCKSIZES,
    COMPUTE_DTYPE_NAMES,
    QUANT_STORAGE_NAMES,
    QUANT_TYPES,
    BnbConfig,
)
from lit_cb.quant.registry import register_method

COMPUTE_DTYPES = {name: getattr(torch, name) for name in COMPUTE_DTYPE_NAMES}
QUANT_STORAGES = {name: getattr(torch, name) for name in QUANT_STORAGE_NAMES}
# Linears that stay dense by default: the output head (found by identity with
# ``get_output_embeddings()`` and, for models without it, by these names). Embeddings are not
# ``nn.Linear`` and are never touched.
DEFAULT_EXCLUDE = re.compile(r"(^|\.)(lm_head|embed_out)$")


def bnb_bits_per_weight(config: BnbConfig) -> float:
    """Stored bits per weight of a Linear4bit under ``config`` (see the module docstring for what
    is counted). 4.5 for NF4 with blocksize 64 and no double quantization."""
    if config.compress_statistics:
        return 4 + 8 / config.blocksize + 64 / (config.blocksize * 256)
    return 4 + 32 / config.blocksize


def make_linear4bit(weight: torch.Tensor, bias: torch.Tensor | None, config: BnbConfig) -> nn.Module:
    """A quantized ``bnb.nn.Linear4bit`` holding ``weight`` ``[out, in]`` (quantized from its own
    dtype, on its own device) and ``bias`` (kept dense, frozen)."""
    import bitsandbytes as bnb

    if weight.device.type == "meta":
        raise ValueError("cannot quantize a weight on the meta device; load the model's weights first")
    out_features, in_features = weight.shape
    if weight.numel() % config.blocksize:
        raise ValueError(f"blocksize={config.blocksize} does not divide the {weight.numel()} weights of the layer")
    # Built on meta so that no throwaway dense weight is allocated; both parameters are replaced.
    layer = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=bias is not None,
        compute_dtype=config.torch_compute_dtype,
        compress_statistics=config.compress_statistics,
        quant_type=config.quant_type,
        quant_storage=config.torch_quant_storage,
        device="meta",
    )
    data = weight.detach()
    if data.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        data = data.float()
    param = bnb.nn.Params4bit(
        data.contiguous().clone(),
        requires_grad=False,
        blocksize=config.blocksize,
        compress_statistics=config.compress_statistics,
        quant_type=config.quant_type,
        quant_storage=config.torch_quant_storage,
        module=layer,
    )
    layer.weight = param._quantize(weight.device)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return layer


def _default_include(model: nn.Module) -> Callable[[str, nn.Module], bool]:
    keep_dense: set[int] = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        if fn is not None:
            try:
                mod = fn()
            except (AttributeError, NotImplementedError):
                mod = None
            if mod is not None:
                keep_dense.add(id(mod))

    def include(name: str, module: nn.Module) -> bool:
        return id(module) not in keep_dense and not DEFAULT_EXCLUDE.search(name)

    return include


def swap_linears_bnb4(
    model: nn.Module,
    config: BnbConfig,
    include: str | re.Pattern | Callable[[str, nn.Module], bool] | None = None,
) -> nn.Module:
    """Replace (in place) the selected ``nn.Linear`` modules of ``model`` by quantized
    ``bnb.nn.Linear4bit`` and return ``model``.

    ``include`` selects by qualified module name: a regex (``re.search``) or a callable
    ``(name, module) -> bool``. The default takes every ``nn.Linear`` except the output head and
    embeddings (by identity with ``get_input/output_embeddings()`` and by name), i.e. the
    decoder-block linears. Excluded modules are untouched.
    """
    if include is None:
        select = _default_include(model)
    elif isinstance(include, str | re.Pattern):
        pattern = re.compile(include)

        def select(name: str, module: nn.Module) -> bool:
            return bool(pattern.search(name))

    elif callable(include):
        select = include
    else:
        raise ValueError(f"include={include!r} must be a regex string/pattern, a callable or None")

    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and name and select(name, module)
    ]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = make_linear4bit(module.weight, module.bias, config)
        new.train(module.training)
        setattr(parent, child, new)
    return model


@register_method(BnbConfig, "bnb4")
def quantize_bnb4(
    weight: torch.Tensor, hessian: torch.Tensor | None, config: BnbConfig, bias: torch.Tensor | None = None
) -> nn.Module:
    """Registry transform (Hessian ignored) for drivers that go layer by layer. Note the registry
    hands over float32 weights; :func:`swap_linears_bnb4` quantizes from the model's own dtype,
    which is what the reference protocol (fp16 model) does."""
    del hessian
    return make_linear4bit(weight, bias, config)
