"""``compression.blocks_from``: start a new run from another run's finished blocks.

Compressing SmolLM2-135M takes minutes and a 7B model hours, while the recovery settings are what one
wants to vary. A run's folder is tied to its whole config (:mod:`lit_cb.fingerprint`), so another
recovery cannot resume in it; this copies the finished blocks into a new run's folder instead, after
checking them against the new run's compression inputs exactly as a resume would (settings, model,
data, lit_cb version). The source folder is only read.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from lit_cb.fingerprint import check_same, compression_scope
from lit_cb.integrity import check_blocks_readable

_USE_THE_SAME = (
    "Use the compression settings, model and data that run was compressed with, or compression.blocks_from: "
    "null to compress in this run."
)


def source_blocks(cfg, stored_fingerprint: dict | None, fingerprint: dict) -> Path | None:
    """The blocks folder to copy into ``cfg.run_dir``, checked (raises before anything is written), or
    None: no ``blocks_from``, or a resumed run that has its blocks already (a resume of a run whose
    copy a crash interrupted copies again)."""
    origin = cfg.compression.blocks_from
    if not origin or (stored_fingerprint is not None and (cfg.run_dir / "blocks" / "progress.json").is_file()):
        return None
    src = Path(origin) / "blocks"
    progress = src / "progress.json"
    if not progress.is_file():
        raise ValueError(
            f"compression.blocks_from={origin!r}: {src} holds no finished blocks (no progress.json); allowed: the "
            "folder of a run that compressed (`lit_cb compress` or `lit_cb run`)"
        )
    if src.resolve() == (cfg.run_dir / "blocks").resolve():
        raise ValueError(f"compression.blocks_from={origin!r} is this run's own folder; name another run's folder")
    try:
        blocks = json.loads(progress.read_text())
    except ValueError as err:
        raise ValueError(f"compression.blocks_from={origin!r}: {progress} is corrupt ({err})") from err
    if not blocks.get("fingerprint"):
        raise ValueError(
            f"compression.blocks_from={origin!r}: {progress} records no fingerprint (an older lit_cb), so whether "
            "its blocks fit this run cannot be checked"
        )
    check_blocks_readable(src, blocks.get("blocks", {}))
    check_same(blocks["fingerprint"], compression_scope(fingerprint), f"the finished blocks in {src}", _USE_THE_SAME)
    return src


def copy_blocks(src: Path, run_dir: Path, writer: bool, timeout_s: float = 1800.0) -> None:
    """Copy ``src`` to ``run_dir/blocks`` (``writer``: the process that writes the run folder), through
    a temporary folder renamed at the end, so the blocks appear whole or not at all. Other processes
    wait for them (a several-process run on a shared file system)."""
    dest = run_dir / "blocks"
    if writer:
        tmp = run_dir / "blocks.copying"
        if tmp.exists():
            shutil.rmtree(tmp)  # a copy a crash interrupted: never a run's own blocks
        shutil.copytree(src, tmp)
        tmp.rename(dest)
        return
    deadline = time.monotonic() + timeout_s
    while not (dest / "progress.json").is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the blocks copied from {src} did not appear in {dest} within {timeout_s:.0f} s")
        time.sleep(1.0)
