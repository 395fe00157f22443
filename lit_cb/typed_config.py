"""Dataclasses from nested dicts (YAML), with errors that name the unknown or bad key.

Every config section of lit_cb is a dataclass that validates its own values; this module only
maps dicts onto them, so a typo anywhere fails with the key's full path and what is allowed.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def build(cls: type, values: dict | None, where: str = ""):
    """Instantiate dataclass ``cls`` from a nested dict, rejecting unknown keys by name."""
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ValueError(
            f"unknown config key(s) {[prefix + k for k in unknown]}; allowed in {where or 'top level'}: {sorted(known)}"
        )
    kwargs = {}
    for name, value in values.items():
        tp = hints[name]
        key = f"{where}.{name}" if where else name
        if _is_dataclass_type(tp):
            if not isinstance(value, dict):
                raise ValueError(f"config key {key} must be a mapping, got {value!r}")
            kwargs[name] = build(tp, value, key)
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"bad config for {where or 'top level'}: {err}") from err
