"""Checks that a file on disk is the one lit_cb wrote, and that what it holds is usable.

Shapes are not enough: a truncated or bit-flipped file, two same-shape tensors swapped, or codes
outside ``[0, 2**B)`` all load into a model of the right structure and give silently wrong
outputs. So a model folder gets a ``manifest.json`` written last (sha256 and size of every file,
and sha256 of every tensor of each safetensors file); loading verifies it, then the values
(codes in range, finite codebooks and scales). Each error names the file or the tensor/layer and
how to recover.

The loaders call these through one-line hooks; nothing here knows a method or a model family.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from lit_cb.layers import code_bits

MANIFEST = "manifest.json"
_CHUNK = 1 << 22


class IntegrityError(ValueError):
    """A file does not hold what lit_cb wrote there, or holds unusable values."""


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (two tensors of one shape and dtype differ
    unless their values are identical)."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}:".encode())
    if t.numel():
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary name, fsync, then rename over ``path`` (never half a file)."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _safetensors_tensor_hashes(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {name: tensor_sha256(f.get_tensor(name)) for name in f.keys()}  # noqa: SIM118


def write_manifest(directory: str | Path) -> Path:
    """Record sha256 and size of every file under ``directory`` (and of every tensor of its
    safetensors files) in ``manifest.json``. Call it last, after every other file is written."""
    root = Path(directory)
    files, tensors = {}, {}
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name == MANIFEST or ".tmp" in p.name:
            continue
        rel = p.relative_to(root).as_posix()
        with open(p, "rb") as f:  # flush the writer's data to disk before the manifest vouches for it
            os.fsync(f.fileno())
        files[rel] = {"sha256": file_sha256(p), "bytes": p.stat().st_size}
        if p.suffix == ".safetensors":
            tensors[rel] = _safetensors_tensor_hashes(p)
    body = {"files": files, "tensors": tensors}
    atomic_write_text(root / MANIFEST, json.dumps({**body, "self_sha256": _manifest_digest(body)}, indent=1))
    return root / MANIFEST


def _manifest_digest(body: dict) -> str:
    """sha256 of the manifest's own records (canonical JSON): a damaged record that still parses (one hex
    digit of a tensor hash, which only a changed file would consult) is caught too."""
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _describe_tensor_changes(path: Path, expected: dict[str, str]) -> str:
    """Which tensors of a safetensors file differ from the manifest (and which were swapped)."""
    try:
        actual = _safetensors_tensor_hashes(path)
    except Exception as err:  # noqa: BLE001 - any parse error means the file is unreadable
        return f"the file cannot be parsed as safetensors ({err})"
    by_hash = {h: n for n, h in expected.items()}
    parts = []
    for name in sorted(set(expected) | set(actual)):
        if name not in actual:
            parts.append(f"tensor {name} is missing")
        elif name not in expected:
            parts.append(f"tensor {name} is not in the manifest")
        elif actual[name] != expected[name]:
            other = by_hash.get(actual[name])
            parts.append(f"tensor {name} holds the values of {other}" if other else f"tensor {name} was modified")
    return "; ".join(parts) or "the tensors match but the file's other bytes (header/metadata) changed"


def verify_model_dir(directory: str | Path) -> None:
    """Check every file listed in ``manifest.json`` against its size and sha256; raise naming
    the file (and the tensors) that differ."""
    root = Path(directory)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise IntegrityError(
            f"{root} has no {MANIFEST}: it was not completely written by lit_cb (an interrupted save, or an "
            "older lit_cb). Save the model again, or rerun the run that made it."
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        files = {rel: (int(e["bytes"]), str(e["sha256"])) for rel, e in manifest["files"].items()}
        tensor_hashes = dict(manifest.get("tensors", {}))
        stated = manifest.get("self_sha256")  # absent in manifests written before it existed
        if stated is not None and stated != _manifest_digest({"files": manifest["files"], "tensors": tensor_hashes}):
            raise ValueError("its records do not match its own sha256")
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
        raise IntegrityError(
            f"{manifest_path} is corrupt ({type(err).__name__}: {err}); restore the folder from a copy or save "
            "the model again"
        ) from err
    problems = []
    for rel, (nbytes, sha) in files.items():
        p = root / rel
        if not p.is_file():
            problems.append(f"{p}: missing")
            continue
        size = p.stat().st_size
        if size == nbytes and file_sha256(p) == sha:
            continue
        # A rewritten safetensors file can differ in size (another writer's header) and still parse:
        # then name the tensors that changed; one that no longer parses is reported by its size.
        detail = _describe_tensor_changes(p, tensor_hashes[rel]) if rel in tensor_hashes else "content changed"
        if size != nbytes and (rel not in tensor_hashes or detail.startswith("the file cannot be parsed")):
            what = "truncated" if size < nbytes else "longer than written"
            problems.append(f"{p}: {what} ({size} bytes, {nbytes} written)")
        else:
            problems.append(f"{p}: sha256 differs from {MANIFEST}: {detail}")
    if problems:
        raise IntegrityError(
            f"{root} does not hold what lit_cb wrote (checked against {MANIFEST}):\n  - "
            + "\n  - ".join(problems)
            + "\nRestore the folder from a copy or save the model again; do not use these files."
        )


def check_values(model: nn.Module, source: str | Path = "") -> None:
    """Codes in ``[0, 2**B)`` and finite codebooks/scales for every compressed module; raise
    naming the layer. (uint8/int16 storage can hold codes the format does not allow: B=4 leaves
    values 16..255 that dequantization would silently mask.)"""
    where = f" in {source}" if source else ""
    for name, m in model.named_modules():
        codes = getattr(m, "codes", None)
        if not isinstance(codes, torch.Tensor) or not codes.numel():
            continue
        nbits = code_bits(m)
        if nbits is None:
            continue
        values = codes.to(torch.int64)
        if nbits >= 16:
            values = values & 0xFFFF  # int16 storage wraps codes >= 2**15; all 16-bit values are valid
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi >= 2**nbits:
            raise IntegrityError(
                f"layer {name}{where}: codes lie in [{lo}, {hi}], outside [0, {2**nbits}) for {nbits}-bit codes; "
                "the file is corrupt or was written by another tool"
            )
        for attr in ("codebooks", "scales", "zeros", "low_rank_a", "low_rank_b"):
            t = getattr(m, attr, None)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
                raise IntegrityError(f"layer {name}{where}: {attr} holds NaN or Inf values")


def load_checkpoint(path: str | Path) -> dict:
    """A Lightning checkpoint, unpickled with ``weights_only=True`` (tensors and plain types
    only); a truncated or foreign file gives an error naming it and how to recover."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises several types for corrupt files
        raise IntegrityError(
            f"{path} cannot be loaded ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
            "It is truncated, corrupt, or holds objects other than tensors and plain types. To recover: move it "
            f"away, then either rename a step checkpoint of {path.parent} (if any) to {path.name}, or resume without "
            "one: compression is restored from the finished blocks and recovery restarts at step 0."
        ) from err


def check_blocks_readable(directory: str | Path, finished: dict) -> None:
    """Each finished block's safetensors file exists and its header and size are intact (a
    block file is written under a temporary name and renamed, so only outside damage breaks it)."""
    for index in sorted(finished, key=int):
        path = Path(directory) / f"block_{int(index):03d}.safetensors"
        try:
            with open(path, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(header_len))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if path.stat().st_size != 8 + header_len + end:
                raise ValueError(f"{path.stat().st_size} bytes, {8 + header_len + end} expected")
        except Exception as err:  # noqa: BLE001 - missing, truncated, or not safetensors
            raise IntegrityError(
                f"finished block file {path} is missing or corrupt ({err}). Restore it from a copy, or move the "
                f"folder {Path(directory)} away to compress from scratch."
            ) from err
