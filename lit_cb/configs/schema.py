"""The ``--help`` listing of a config class: every key with its type, default, allowed values and
one-line meaning, from the dataclasses themselves (:func:`lit_cb.typed_config.describe_fields`).

Free-form ``dict`` fields hold the fields of another dataclass (the compression method's config,
block fine-tuning, the report's per-method settings); :data:`DICT_FIELDS` says which, so their keys
are listed too. A test checks that every ``dict`` field of every config class appears here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lit_cb.configs import methods
from lit_cb.configs.block_finetune import BlockFinetuneConfig
from lit_cb.configs.bnb import BnbConfig
from lit_cb.configs.compression import CompressionConfig
from lit_cb.configs.dense import GPTQConfig, RTNConfig
from lit_cb.configs.report import _DRIVER_KEYS, ReportConfig
from lit_cb.typed_config import FieldHelp, describe_fields


@dataclasses.dataclass(frozen=True)
class DriverFields:
    """The compression-driver subset of :class:`CompressionConfig` a report may set."""

    names: tuple[str, ...] = _DRIVER_KEYS


# (class, dict field) -> the dataclass whose fields it holds; "method" means: the config class of
# the selected compression method.
DICT_FIELDS: dict[tuple[type, str], Any] = {
    (CompressionConfig, "method_config"): "method",
    (CompressionConfig, "block_finetune"): BlockFinetuneConfig,
    (ReportConfig, "rtn"): RTNConfig,
    (ReportConfig, "gptq"): GPTQConfig,
    (ReportConfig, "bnb"): BnbConfig,
    (ReportConfig, "compression"): DriverFields(),
}


def _lookup(raw: dict, key: str) -> tuple[bool, Any]:
    node: Any = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def config_keys(cls: type, raw: dict | None = None) -> list[FieldHelp]:
    """Every key of ``cls`` for ``--help``; ``raw`` (the YAML + overrides, not yet validated) picks
    the compression method whose fields are listed under ``compression.method_config``."""
    raw = raw or {}
    found, method = _lookup(raw, "compression.method")
    if not found or method not in methods.method_names():
        method = CompressionConfig.method
    schemas: dict[tuple[type, str], Any] = {}
    filters: dict[str, tuple[str, ...]] = {}
    for (owner, name), target in DICT_FIELDS.items():
        if target == "method":
            schemas[(owner, name)] = {method: methods.config_class(method)}
        elif isinstance(target, DriverFields):
            schemas[(owner, name)] = CompressionConfig
            filters[name] = target.names
        else:
            schemas[(owner, name)] = target
    keys = describe_fields(cls, schemas=schemas)
    out = []
    for h in keys:
        head, _, rest = h.key.partition(".")
        if cls is ReportConfig and head in filters and rest and rest not in filters[head]:
            continue
        if h.key.endswith("compression.method") and h.allowed is None:
            h = dataclasses.replace(h, allowed=methods.method_names())
        out.append(h)
    return out
