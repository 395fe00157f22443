"""Map each method's config dataclass to the function that compresses one linear layer.

torchao-style: a method is a frozen config dataclass plus one registered transform. The
sequential compression driver only ever calls :func:`quantize_linear`, so adding a method means
adding a config and registering its transform, nothing else.

A transform has the signature ``fn(weight, hessian, config, bias) -> nn.Module`` where
``weight`` is the float32 ``[out, in]`` weight, ``hessian`` the float32 ``[in, in]`` input second
moment ``XᵀX / n_tokens`` from :class:`lit_cb.hessian.HessianAccumulator`, ``bias`` the float
bias or None; it returns the module that replaces the ``nn.Linear``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

QuantizeFn = Callable[[torch.Tensor, torch.Tensor, Any, "torch.Tensor | None"], nn.Module]

_REGISTRY: dict[type, QuantizeFn] = {}
_BY_NAME: dict[str, type] = {}


def register_method(config_cls: type, name: str) -> Callable[[QuantizeFn], QuantizeFn]:
    """Decorator: register ``fn`` as the transform for ``config_cls`` under ``name``."""

    def wrap(fn: QuantizeFn) -> QuantizeFn:
        _REGISTRY[config_cls] = fn
        _BY_NAME[name] = config_cls
        return fn

    return wrap


def method_names() -> list[str]:
    _import_builtin_methods()
    return sorted(_BY_NAME)


def config_class(name: str) -> type:
    """The config dataclass registered under ``name`` (e.g. ``"codebook"``, ``"aqlm"``)."""
    _import_builtin_methods()
    if name not in _BY_NAME:
        raise ValueError(f"unknown compression method {name!r}; known methods: {sorted(_BY_NAME)}")
    return _BY_NAME[name]


def method_name(config: Any) -> str:
    _import_builtin_methods()
    for name, cls in _BY_NAME.items():
        if type(config) is cls:
            return name
    raise TypeError(f"{type(config).__name__} is not a registered method config; known: {sorted(_BY_NAME)}")


def quantize_linear(layer: nn.Linear, hessian: torch.Tensor, config: Any) -> nn.Module:
    """Compress one ``nn.Linear`` with the method that ``config`` selects."""
    _import_builtin_methods()
    fn = _REGISTRY.get(type(config))
    if fn is None:
        raise TypeError(f"no method registered for {type(config).__name__}; known: {sorted(_BY_NAME)}")
    weight = layer.weight.detach().float()
    bias = None if layer.bias is None else layer.bias.detach().float()
    return fn(weight, hessian.to(weight.device, torch.float32), config, bias)


def _import_builtin_methods() -> None:
    # Importing the method modules runs their @register_method decorators.
    from lit_cb.quant import aqlm, codebook, gptq, rtn  # noqa: F401
