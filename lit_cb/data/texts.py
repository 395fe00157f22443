"""Where the texts live: the copies shipped in the package, or a user's local files."""

from __future__ import annotations

import lzma
from pathlib import Path

_TEXTS = Path(__file__).parent / "texts"
EMBEDDED = {
    "c4": _TEXTS / "c4_train_first1000.jsonl.xz",
    "wikitext2": _TEXTS / "wikitext2_test.txt.xz",
}


def embedded_text_path(name: str) -> Path:
    """Path of a shipped text (``"c4"`` or ``"wikitext2"``)."""
    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded text {name!r}; shipped texts: {sorted(EMBEDDED)}")
    return EMBEDDED[name]


def resolve_text(source: str) -> Path:
    """An embedded name or an existing local file."""
    if source in EMBEDDED:
        return EMBEDDED[source]
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"text source {source!r} is neither a shipped text ({sorted(EMBEDDED)}) nor an existing file"
        )
    return path


def read_eval_text(source: str) -> str:
    """The evaluation string exactly as stored (newlines untouched: the GPTQ/AQLM protocol
    tokenizes the whole joined string once), decompressing ``.xz`` files."""
    path = resolve_text(source)
    if path.suffix == ".xz":
        with lzma.open(path, "rt", encoding="utf-8", newline="") as f:
            return f.read()
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()
