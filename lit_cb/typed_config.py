"""Dataclasses from nested dicts (YAML), with errors that name the unknown or bad key.

Every config section of lit_cb is a dataclass that validates its own values in ``__post_init__``;
this module maps dicts onto them and, first, checks each value against its field's annotation
(int, float, bool, str, ``X | None``, ``Literal[...]``, ``list[...]``, ``dict``, nested dataclass),
so a wrong type fails as ``recovery.max_steps='abc' must be an int`` instead of as a comparison
error deep inside a validator. The same annotations and the fields' attribute docstrings give the
``--help`` listing (:func:`describe_fields`), so help and errors cannot drift apart.

Torch-free on purpose: ``--help`` and config validation import only this and :mod:`lit_cb.configs`.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def describe_type(tp: Any) -> str:
    """What a value of type ``tp`` must be, in words: ``an int``, ``null or a float``, ``one of the
    allowed values [...]``."""
    if tp is Any:
        return "any value"
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an int"
    if tp is float:
        return "a float"
    if tp is str:
        return "a string"
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return f"one of the allowed values {list(typing.get_args(tp))}"
    if _is_union(tp):
        args = typing.get_args(tp)
        words = [describe_type(a) for a in args if a is not type(None)]
        if type(None) in args:
            words.insert(0, "null")
        return " or ".join(words)
    if origin in (list, tuple):
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return f"a list of {_plural(item)}"
    if origin is dict or tp is dict:
        return "a mapping"
    if _is_dataclass_type(tp):
        return "a mapping"
    return f"a {getattr(tp, '__name__', tp)}"


def _plural(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return f"the allowed values {list(typing.get_args(tp))}"
    return {int: "ints", float: "floats", str: "strings", bool: "booleans"}.get(tp, describe_type(tp))


def type_label(tp: Any) -> str:
    """Short type name for help: ``int``, ``float | null``, ``str``, ``list[str]``, ``mapping``."""
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is Literal:
        kinds = {type(v) for v in typing.get_args(tp)}
        return kinds.pop().__name__ if len(kinds) == 1 else "value"
    if _is_union(tp):
        return " | ".join(type_label(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return f"list[{type_label(item)}]"
    if origin is dict or tp is dict or _is_dataclass_type(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def allowed_values(tp: Any) -> list | None:
    """The values a ``Literal`` (or ``Literal | None``, or ``list[Literal]``) field accepts; else None."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return list(typing.get_args(tp))
    if _is_union(tp) or origin in (list, tuple):
        values = []
        for arg in typing.get_args(tp):
            if arg is type(None):
                values.append(None)
            else:
                sub = allowed_values(arg)
                if sub is None:
                    return None
                values.extend(sub)
        return values
    return None


class _Mismatch(Exception):
    pass


def _coerce(tp: Any, value: Any) -> Any:
    """``value`` if it has type ``tp`` (ints pass as floats; YAML's ``1e-4``, a string, as a
    float); raises :class:`_Mismatch` otherwise. Nested dataclasses are built by :func:`build`."""
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                raise _Mismatch from None
            if math.isfinite(number):
                return number
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    origin = typing.get_origin(tp)
    if origin is Literal:
        for allowed in typing.get_args(tp):
            if value == allowed and type(value) is type(allowed):
                return value
        raise _Mismatch
    if _is_union(tp):
        for arg in typing.get_args(tp):
            try:
                return _coerce(arg, value)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise _Mismatch
        (item,) = typing.get_args(tp)[:1] or (Any,)
        items = [_coerce(item, v) for v in value]
        return items if origin is list else tuple(items)
    if origin is dict or tp is dict:
        if isinstance(value, dict):
            return value
        raise _Mismatch
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _Mismatch


def check_value(tp: Any, value: Any, key: str) -> Any:
    """``value`` (a YAML float string converted) if it matches ``tp``; else a ValueError that
    names the key, the value and what is allowed."""
    try:
        return _coerce(tp, value)
    except _Mismatch:
        raise ValueError(f"{key}={value!r} must be {describe_type(tp)}") from None


def build(cls: type, values: dict | None, where: str = ""):
    """Instantiate dataclass ``cls`` from a nested dict: unknown keys and values of the wrong type
    are rejected by name before ``cls.__post_init__`` validates ranges and combinations."""
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(values) - set(known))
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
            kwargs[name] = check_value(tp, value, key)
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"bad config for {where or 'top level'}: {err}") from err
    except ValueError as err:
        # Section validators name their field; make sure the message also says where it sits.
        message = str(err)
        if where and where not in message:
            raise ValueError(f"{where}: {message}") from err
        raise


# -- help ----------------------------------------------------------------------------------------


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass's fields (the string literal right below a field),
    collected along the MRO, read from the source with ``ast``."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body
        for stmt, nxt in zip(body, body[1:], strict=False):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = " ".join(inspect.cleandoc(nxt.value.value).split())
    return docs


@dataclass(frozen=True)
class FieldHelp:
    """One config key as ``--help`` lists it."""

    key: str
    type: str
    default: Any
    allowed: list | None
    doc: str


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return None


def describe_fields(
    cls: type, prefix: str = "", schemas: dict | None = None, defaults: dict | None = None
) -> list[FieldHelp]:
    """Every key of dataclass ``cls``, nested sections flattened to ``section.key``.

    ``schemas`` maps ``(cls, field_name)`` of a free-form ``dict`` field to the dataclass (or a
    ``{label: dataclass}`` mapping) whose fields it holds, so those are listed too, as
    ``field.key`` (with ``[label]`` before its help). ``defaults`` overrides the class defaults (a
    section whose parent builds it with other values, e.g. the report's recovery section)."""
    schemas = schemas or {}
    defaults = defaults or {}
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    out: list[FieldHelp] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        default = defaults.get(f.name, _default(f))
        if _is_dataclass_type(tp):
            out.extend(describe_fields(tp, f"{key}.", schemas, default))
            continue
        out.append(FieldHelp(key, type_label(tp), default, allowed_values(tp), docs.get(f.name, "")))
        schema = schemas.get((cls, f.name))
        if schema is None:
            continue
        for label, sub in schema.items() if isinstance(schema, dict) else [(None, schema)]:
            for h in describe_fields(sub, f"{key}.", schemas):
                doc = f"[{label}] {h.doc}" if label else h.doc
                out.append(dataclasses.replace(h, doc=doc))
    return out
