"""What a run was made from: its config, the model, the data and the lit_cb version.

Saved progress (finished blocks, Lightning checkpoints, the final model folder) is only valid for
the inputs that produced it. A fingerprint is stored next to each of them and compared before a
resume: a run whose fingerprint differs refuses, naming the part that changed (config key paths,
model, data or version) and how to start fresh, instead of silently mixing two runs' results.

Fingerprints are plain JSON (dicts of strings and numbers), so they travel in ``progress.json``,
in Lightning checkpoints loaded with ``weights_only=True`` and in ``compression.json``.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# Bytes hashed at each end of a large weight file: enough to tell two checkpoints of one shape
# apart (their first tensors differ) without reading gigabytes on every start.
EDGE_BYTES = 1 << 20
# Files up to this size are hashed whole.
WHOLE_FILE_BYTES = 4 * EDGE_BYTES

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")

# Config keys that may change between a run and its resume: where it lives, what is only
# reported, and how long recovery trains (a longer max_steps extends training; note that the
# cosine schedule is laid over max_steps, so the extended run is not the same as one planned
# that long from the start). data.teacher_cache_dir is only where the shared teacher text lives,
# like output_dir: the tokens are fixed by the teacher settings (data.teacher_seed and the others
# are compared), each cache folder carries their fingerprint and is checked on load, and the run
# records the sha256 of the tokens it trains on (<run>/teacher_text.json), so a resume with the
# cache moved elsewhere trains on the same tokens or refuses (lit_cb.data.teacher_text).
RESUMABLE_KEYS: tuple[str, ...] = (
    "run_name",
    "output_dir",
    "data.teacher_cache_dir",
    "trainer.train_lock",  # only when training may start, not what it computes
    "compression.blocks_from",  # where the finished blocks were copied from; their own fingerprint is checked
    "resume",
    "overwrite",
    "eval.",
    "recovery.max_steps",
    "recovery.cuda_graphs",  # how the step is launched; the graphs are checked against eager (lit_cb/step_graphs.py)
    "trainer.log_every_n_steps",
    "trainer.val_check_interval",
    "data.num_workers",
)

# What block checkpoints depend on: everything up to the end of compression. Recovery, eval and
# trainer settings of a later stage do not invalidate finished blocks.
COMPRESSION_KEYS: tuple[str, ...] = (
    "seed",
    "model.",
    "compression.",
    "data.calibration_source",
    "data.num_calibration_samples",
    "data.calibration_seqlen",
    "data.calibration_sampling",
    "data.text_field",
    "data.seed",
)


def _version() -> str:
    from lit_cb import __version__

    return __version__


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and scalars are leaves (JSON-normalised)."""
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): json.loads(json.dumps(tree, default=str))}


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def file_identity(path: Path) -> str:
    """sha256 of a file's size and content (whole below 4 MiB, else its first and last MiB)."""
    size = path.stat().st_size
    h = hashlib.sha256(f"{size}:".encode())
    with open(path, "rb") as f:
        if size <= WHOLE_FILE_BYTES:
            h.update(f.read())
        else:
            h.update(f.read(EDGE_BYTES))
            f.seek(size - EDGE_BYTES)
            h.update(f.read(EDGE_BYTES))
    return h.hexdigest()


# config.json keys that record who wrote the file, not what the model computes: transformers stamps its own
# version into every config it saves, so the same checkpoint converted or saved under another release hashes
# differently byte for byte.
VOLATILE_CONFIG_KEYS = ("transformers_version",)


def semantic_config_hash(config: dict) -> str:
    """sha256 of a model config without :data:`VOLATILE_CONFIG_KEYS`, keys sorted: equal for the same model written
    by two transformers releases, different when any field the model is built from differs."""
    kept = {k: v for k, v in config.items() if k not in VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def model_identity(name: str, model=None) -> dict[str, str]:
    """Identity of the model a run starts from: the hash of its ``config.json`` and of each
    weight file (size + content edges). For a hub id without a local folder, the config and the
    resolved commit. ``model`` (the loaded transformers model) supplies the config for the
    embedded model and hub ids.

    ``config`` hashes the file's bytes (what fingerprints held before ``config_semantic`` existed, and what teacher-text
    caches are keyed on); ``config_semantic`` hashes its content without the writer's version
    (:func:`semantic_config_hash`), so blocks compressed under one transformers release resume, or recover, under
    another (:func:`differences` compares it when both sides have it)."""
    from lit_cb.models import EMBEDDED_MODELS, cache_dir

    folder = Path(name).expanduser()
    if name in EMBEDDED_MODELS:
        folder = cache_dir() / f"{name}-safetensors"
    ident: dict[str, str] = {"name": name}
    if folder.is_dir():
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
        h = hashlib.sha256()
        for p in files:
            h.update(f"{p.relative_to(folder)}={file_identity(p)};".encode())
        ident["weights"] = h.hexdigest()
        cfg = folder / "config.json"
        if cfg.is_file():
            raw = cfg.read_bytes()
            ident["config"] = hashlib.sha256(raw).hexdigest()
            ident["config_semantic"] = semantic_config_hash(json.loads(raw))
    elif model is not None:
        text = model.config.to_json_string(use_diff=False)
        ident["config"] = hashlib.sha256(text.encode()).hexdigest()
        ident["config_semantic"] = semantic_config_hash(json.loads(text))
        ident["commit"] = str(getattr(model.config, "_commit_hash", None))
    return ident


def data_identity(data_config) -> dict[str, str]:
    """sha256 of each text source the data config names (shipped or local)."""
    from lit_cb.data.texts import resolve_text

    out = {}
    for field in ("calibration_source", "finetune_source", "eval_source"):
        source = getattr(data_config, field)
        out[field] = hashlib.sha256(resolve_text(source).read_bytes()).hexdigest()
    return out


def run_fingerprint(cfg, model=None) -> dict:
    """The fingerprint of a run of ``cfg`` (a RunConfig) on its model and data."""
    return {
        "config": flatten(cfg.to_dict()),
        "model": model_identity(cfg.model.name, model),
        "data": data_identity(cfg.data),
        "version": _version(),
    }


def compression_scope(fp: dict) -> dict:
    """The part of a run fingerprint that finished blocks depend on."""
    return {
        "config": {k: v for k, v in fp["config"].items() if _matches(k, COMPRESSION_KEYS)},
        "model": fp["model"],
        "data": {"calibration_source": fp["data"]["calibration_source"]},
        "version": fp["version"],
    }


@functools.cache
def config_defaults() -> dict[str, Any]:
    """Every config key path with its default value (flattened like a fingerprint's config)."""
    from lit_cb.configs.run import RunConfig

    return flatten(RunConfig().to_dict())


def differences(stored: dict, current: dict, ignore: Iterable[str] = RESUMABLE_KEYS) -> list[str]:
    """Human-readable lines naming what differs between two fingerprints (empty if nothing). A key the
    stored fingerprint lacks counts as its default: a run made before lit_cb had the key ran as the
    default does (new keys default to the old behaviour), so it still resumes after an upgrade."""
    lines = []
    a, b = stored.get("config", {}), current.get("config", {})
    defaults = config_defaults()
    for key in sorted(set(a) | set(b)):
        if _matches(key, ignore):
            continue
        if key not in a and key in defaults and b.get(key) == defaults[key]:
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            lines.append(f"config {key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    for part in ("model", "data"):
        sa, sb = stored.get(part, {}), current.get(part, {})
        changed = sorted(k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k))
        if part == "model":
            changed = _model_changes(sa, sb, changed)
        if changed:
            lines.append(f"{part}: {', '.join(changed)} changed ({part} identity {sa} -> {sb})")
    if stored.get("version") != current.get("version"):
        lines.append(f"lit_cb version: {stored.get('version')} -> {current.get('version')}")
    return lines


def _model_changes(stored: dict, current: dict, changed: list[str]) -> list[str]:
    """The model identity's changed keys, with the config judged by content where both sides hash it so: a config
    that differs only in the writer's transformers version is the same model. A fingerprint from before
    ``config_semantic`` existed is compared by the file's bytes, as it was made."""
    if "config_semantic" not in stored or "config_semantic" not in current:
        return [k for k in changed if k != "config_semantic"]
    if stored["config_semantic"] == current["config_semantic"]:
        return [k for k in changed if k != "config"]
    return changed


class FingerprintMismatch(ValueError):
    """Saved progress was made from other inputs than the ones given now."""


def check_same(stored: dict | None, current: dict | None, what: str, how_to_start_fresh: str) -> None:
    """Raise :class:`FingerprintMismatch` naming every difference, or return if none (or if
    either side has no fingerprint: library use without one)."""
    if not stored or not current:
        return
    diff = differences(stored, current)
    if diff:
        raise FingerprintMismatch(
            f"{what} was made from other inputs and cannot be resumed:\n  - "
            + "\n  - ".join(diff)
            + f"\n{how_to_start_fresh}"
        )
