"""A fresh output folder that appears only once it is complete.

Exports never overwrite: an ``--out`` that exists and holds anything is refused before any work,
and the files are written to a hidden sibling folder that is renamed into place at the end, so a
failed export leaves neither a half-written folder nor a changed existing one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def check_new_output_dir(out_dir: str | Path) -> Path:
    """``out_dir`` as a Path if it does not exist or is an empty folder; raises otherwise."""
    out = Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"--out {out} exists and is not a folder; give a new or empty folder")
        if any(out.iterdir()):
            raise FileExistsError(f"--out {out} exists and is not empty; refusing to overwrite it")
    return out


@contextmanager
def new_output_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary folder to write into; on success it becomes ``out_dir``."""
    out = check_new_output_dir(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        check_new_output_dir(out)  # still free: nothing appeared there while we wrote
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
