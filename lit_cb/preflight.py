"""Checks that run before any work: bad input fails in seconds, with the value and what is
allowed, not after the float evaluation or six blocks into compression.

``check_text_sources`` needs only the config (files present, non-empty, UTF-8, parseable);
``check_model`` needs the loaded model (target patterns that match nothing, widths that the
method's group sizes do not divide, NaN/Inf weights), and runs right after loading, before any
evaluation or compression. Neither writes anything.
"""

from __future__ import annotations

import json
import lzma
import re
from pathlib import Path

import torch
from torch import nn

from lit_cb.architectures import spec_for
from lit_cb.data.texts import EMBEDDED, resolve_text
from lit_cb.models import decoder_layers

_SOURCES = ("calibration_source", "finetune_source", "eval_source")


def _read_bytes(path: Path) -> bytes:
    if path.suffix == ".xz":
        try:
            return lzma.decompress(path.read_bytes())
        except lzma.LZMAError as err:
            raise ValueError(f"{path} is not a valid .xz file ({err})") from err
    return path.read_bytes()


def check_text_source(source: str, key: str) -> None:
    """``source`` (a shipped name or a file) exists, is non-empty UTF-8 text, and a .jsonl file
    holds one JSON object per line."""
    if source in EMBEDDED:
        return  # shipped and tested
    try:
        path = resolve_text(source)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{key}={source!r}: {err}") from err
    raw = _read_bytes(path)
    if not raw.strip():
        raise ValueError(f"{key}={source!r}: the file {path} is empty; give a text file with documents")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ValueError(
            f"{key}={source!r}: the file {path} is not UTF-8 text (byte {err.start}, line {line}: "
            f"{raw[err.start : err.start + 1]!r}); convert it to UTF-8"
        ) from err
    name = path.name.removesuffix(".xz").removesuffix(".gz")
    if name.endswith(".jsonl"):
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as err:
                raise ValueError(f"{key}={source!r}: line {i} of {path} is not JSON ({err})") from err
            if not isinstance(obj, dict):
                raise ValueError(f"{key}={source!r}: line {i} of {path} is not a JSON object")


def check_text_sources(data_config) -> None:
    """Every text source of a :class:`~lit_cb.data.DataConfig`, named by its key on failure."""
    for field in _SOURCES:
        check_text_source(getattr(data_config, field), f"data.{field}")


def target_linears(model: nn.Module, pattern: str) -> dict[str, nn.Linear]:
    """Full names of the linears of the decoder blocks that ``pattern`` selects (the driver
    matches it against names inside a block, e.g. ``self_attn.q_proj``; the default pattern means
    the model family's own linears, as in the driver)."""
    arch = spec_for(model)
    regex = re.compile(arch.compression_targets(pattern))
    found = {}
    for i, block in enumerate(arch.decoder_layers(model)):
        for name, m in block.named_modules():
            if isinstance(m, nn.Linear) and regex.search(name):
                found[f"{arch.block_prefix(i)}{name}"] = m
    return found


def _group_sizes(method_cfg) -> list[tuple[str, str, int]]:
    """(config field, which dimension it divides, value) for the group-size fields a method has."""
    out = []
    for field, dim in (("in_group_size", "in"), ("out_group_size", "out"), ("group_size", "in")):
        value = getattr(method_cfg, field, None)
        if isinstance(value, int) and value > 0:
            out.append((field, dim, value))
    return out


def check_model(model: nn.Module, compression_config) -> None:
    """Target patterns that select no linear, widths the method cannot split into groups, bit
    options that do not fit a layer or a bit budget below the cheapest allocation, and NaN/Inf
    weights: each error names the pattern or the layer and what is allowed."""
    cfg = compression_config
    targets = target_linears(model, cfg.targets)
    if not targets:
        block0 = sorted(n for n, m in decoder_layers(model)[0].named_modules() if isinstance(m, nn.Linear)) or [
            "(none)"
        ]
        raise ValueError(
            f"compression.targets={cfg.targets!r} matches no linear layer of the model; the linears of each "
            f"block are named {block0} (the pattern is searched in these names)"
        )
    method_cfg = cfg.method_settings()
    for name, layer in targets.items():
        for field, dim, size in _group_sizes(method_cfg):
            width = layer.in_features if dim == "in" else layer.out_features
            if width % size:
                raise ValueError(
                    f"compression.method_config.{field}={size} does not divide the {dim}put width {width} of "
                    f"layer {name} (weight {layer.out_features}x{layer.in_features}); use a divisor of {width}, "
                    "or leave the layer out of compression.targets"
                )
    if cfg.bit_budget is not None:
        from lit_cb.sensitivity import check_bit_budget

        check_bit_budget(targets, cfg)  # every option fits every layer; the budget is reachable
    for name, p in model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            n_bad = int((~torch.isfinite(p)).sum())
            raise ValueError(
                f"model weight {name} holds {n_bad} NaN/Inf value(s) of {p.numel()}; the model file is corrupt or "
                "was saved after a diverged training run"
            )
