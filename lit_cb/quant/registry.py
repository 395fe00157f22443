"""Map each method's config dataclass to the function that compresses one linear layer.

torchao-style: a method is a frozen config dataclass plus one registered transform. The
sequential compression driver only ever calls :func:`quantize_linear`, so adding a method means
adding a config and registering its transform, nothing else.

The two halves live apart: the name -> config table is :mod:`lit_cb.configs.methods` (torch-free,
what config validation and ``--help`` use); this module holds the transforms. A built-in method's
module is imported the first time a layer is compressed with it, which runs its
``@register_method`` decorator.

A transform has the signature ``fn(weight, hessian, config, bias) -> nn.Module`` where
``weight`` is the float32 ``[out, in]`` weight, ``hessian`` the float32 ``[in, in]`` input second
moment ``XᵀX / n_tokens`` from :class:`lit_cb.hessian.HessianAccumulator`, ``bias`` the float
bias or None; it returns the module that replaces the ``nn.Linear``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lit_cb.configs import methods as _configs
from lit_cb.configs.methods import config_class, method_name  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    import torch
    from torch import nn

QuantizeFn = Callable[["torch.Tensor", "torch.Tensor", Any, "torch.Tensor | None"], "nn.Module"]

_REGISTRY: dict[type, QuantizeFn] = {}
_BY_NAME = _configs._BY_NAME  # the torch-free name -> config table itself (one dict, read here too)
# Built-in methods: name -> the module whose @register_method registers the transform.
_BUILTIN_MODULES = {
    "aqlm": "lit_cb.quant.aqlm",
    "bnb4": "lit_cb.quant.bnb",
    "codebook": "lit_cb.quant.codebook",
    "gptq": "lit_cb.quant.gptq",
    "rtn": "lit_cb.quant.rtn",
    "trellis": "lit_cb.quant.trellis",
}


def register_method(config_cls: type, name: str) -> Callable[[QuantizeFn], QuantizeFn]:
    """Decorator: register ``fn`` as the transform for ``config_cls`` under ``name``."""

    def wrap(fn: QuantizeFn) -> QuantizeFn:
        _REGISTRY[config_cls] = fn
        _configs.register_config(config_cls, name)
        return fn

    return wrap


def method_names() -> list[str]:
    """Every method name; imports the built-in transform modules (so their compressed module types
    are registered with :mod:`lit_cb.serialization` too)."""
    _import_builtin_methods()
    return _configs.method_names()


def transform(config: Any) -> QuantizeFn:
    """The transform registered for ``type(config)``, importing a built-in method's module on first use."""
    fn = _REGISTRY.get(type(config))
    if fn is None:
        try:
            name = _configs.method_name(config)
        except TypeError:
            name = None
        if name in _BUILTIN_MODULES:
            importlib.import_module(_BUILTIN_MODULES[name])
            fn = _REGISTRY.get(type(config))
    if fn is None:
        raise TypeError(f"no method registered for {type(config).__name__}; known: {_configs.method_names()}")
    return fn


def quantize_linear(
    layer: nn.Linear, hessian: torch.Tensor, config: Any, row_weights: torch.Tensor | None = None
) -> nn.Module:
    """Compress one ``nn.Linear`` with the method that ``config`` selects. ``row_weights`` (``[out]``,
    ``compression.row_weighting``) reach only the methods in ``ROW_WEIGHTED_METHODS``, whose transforms
    take them as a keyword; the config refuses them for the others before any work."""
    import torch

    fn = transform(config)
    weight = layer.weight.detach().float()
    bias = None if layer.bias is None else layer.bias.detach().float()
    if row_weights is None:
        return fn(weight, hessian.to(weight.device, torch.float32), config, bias)
    return fn(weight, hessian.to(weight.device, torch.float32), config, bias, row_weights=row_weights)


def _import_builtin_methods() -> None:
    # Importing the method modules runs their @register_method decorators (bnb4 stays lazy: it
    # needs bitsandbytes).
    from lit_cb.quant import aqlm, codebook, gptq, rtn, trellis  # noqa: F401
