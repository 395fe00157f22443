"""Run configuration: typed dataclasses, filled from YAML plus ``key.sub=value`` overrides.

Every section is a dataclass (in :mod:`lit_cb.configs`, torch-free) that validates itself, and
:func:`lit_cb.typed_config.build` checks each value against its field's type first, so a typo or a
bad value fails before any model is loaded, with the key, the value and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lit_cb.configs.run import (  # noqa: F401 (re-exported: the dataclasses live torch-free in lit_cb.configs)
    ACCELERATORS,
    AUTOCAST,
    PRECISIONS,
    EvalConfig,
    ModelConfig,
    RunConfig,
    TrainerConfig,
)
from lit_cb.typed_config import build


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], YAML-parsed value)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    if not key:
        raise ValueError(f"override {text!r} has an empty key")
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def read_config_dict(path: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """YAML file (optional) + overrides -> the nested dict, not yet validated."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} does not exist")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {p} must hold a mapping at the top level")
    for text in overrides or []:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {text!r}: {k} is not a section")
        node[keys[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, cls: type = RunConfig):
    """YAML file (optional) + overrides -> validated ``cls`` (a :class:`RunConfig` by default)."""
    return build(cls, read_config_dict(path, overrides))


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
