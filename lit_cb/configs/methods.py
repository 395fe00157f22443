"""Compression methods by name -> their config dataclass, without importing any transform.

torchao style: a method is a config dataclass plus one transform. This table holds the config
half, so validating ``compression.method`` / ``method_config`` and printing help never import torch;
:mod:`lit_cb.quant.registry` holds the transform half and imports a built-in method's module only
when a layer is actually compressed with it.
"""

from __future__ import annotations

from typing import Any

from lit_cb.configs.aqlm import AQLMConfig
from lit_cb.configs.bnb import BnbConfig
from lit_cb.configs.codebook import CodebookConfig
from lit_cb.configs.dense import GPTQConfig, RTNConfig
from lit_cb.configs.trellis import TrellisConfig

_BY_NAME: dict[str, type] = {
    "aqlm": AQLMConfig,
    "bnb4": BnbConfig,
    "codebook": CodebookConfig,
    "gptq": GPTQConfig,
    "rtn": RTNConfig,
    "trellis": TrellisConfig,
}


def register_config(config_cls: type, name: str) -> None:
    """Make ``name`` select ``config_cls`` (what :func:`lit_cb.quant.registry.register_method` calls)."""
    _BY_NAME[name] = config_cls


def method_names() -> list[str]:
    return sorted(_BY_NAME)


def config_class(name: str) -> type:
    """The config dataclass registered under ``name`` (e.g. ``"codebook"``, ``"aqlm"``)."""
    if name not in _BY_NAME:
        raise ValueError(f"unknown compression method {name!r}; known methods: {sorted(_BY_NAME)}")
    return _BY_NAME[name]


def method_name(config: Any) -> str:
    for name, cls in _BY_NAME.items():
        if type(config) is cls:
            return name
    raise TypeError(f"{type(config).__name__} is not a registered method config; known: {sorted(_BY_NAME)}")
