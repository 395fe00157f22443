"""``compression.blocks_from``: a new run starts from another run's finished blocks (compress once,
recover several ways). Real pipeline runs on the tiny model: the copied run compresses nothing and
holds the same compressed tensors bit for bit; a source made with other compression settings, or
without blocks, is refused before the new run's folder is written; the source is only read."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lit_cb.config import load_config
from lit_cb.pipeline import run

from .conftest import TINY_RUN, save_tiny_model


def _cfg(model_dir: Path, out: Path, name: str, **extra):
    values = {**TINY_RUN, "run_name": name, "output_dir": str(out), "model.name": str(model_dir), **extra}
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def _mtimes(blocks: Path) -> dict[str, int]:
    found = {p.name: p.stat().st_mtime_ns for p in blocks.glob("block_*.safetensors")}
    assert len(found) == 2, found
    return found


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("blocks_from")
    save_tiny_model(root / "model", tiny_tokenizer)
    cfg = _cfg(root / "model", root / "out", "source", **{"recovery.max_steps": 0})
    run(cfg)
    return root, cfg.run_dir


def test_a_run_started_from_another_run_s_blocks_compresses_nothing_and_holds_the_same_tensors(compressed):
    root, source = compressed
    before = _digest(source)
    cfg = _cfg(
        root / "model",
        root / "out",
        "copy",
        **{"recovery.max_steps": 0, "recovery.lr": 0.5, "compression.blocks_from": str(source)},
    )
    run(cfg)
    # Restored, not compressed again: a block compressed here would be written anew (copies keep the mtime).
    assert _mtimes(cfg.run_dir / "blocks") == _mtimes(source / "blocks")
    mine, theirs = (load_file(str(d / "model" / "model.safetensors")) for d in (cfg.run_dir, source))
    assert mine.keys() == theirs.keys() and any(k.endswith(".codes") for k in mine)
    assert all((mine[k] == theirs[k]).all() for k in mine)
    assert _digest(source) == before, "the source run folder was changed"
    # A resume of the copy keeps its own blocks (nothing is copied or compressed again).
    mtimes = _mtimes(cfg.run_dir / "blocks")
    run(cfg)
    assert _mtimes(cfg.run_dir / "blocks") == mtimes


def test_blocks_made_with_other_compression_settings_are_refused_before_the_run_folder_is_written(compressed):
    root, source = compressed
    cfg = _cfg(
        root / "model",
        root / "out",
        "other",
        **{
            "compression.blocks_from": str(source),
            "compression.method_config": "{in_group_size: 4, nbits: 5, kmeans_iters: 2}",
        },
    )
    with pytest.raises(ValueError, match=r"compression.method_config.nbits: 4 -> 5"):
        run(cfg)
    assert not cfg.run_dir.exists()


def test_a_source_without_blocks_is_refused_naming_the_value(compressed, tmp_path):
    root, _ = compressed
    cfg = _cfg(root / "model", root / "out", "none", **{"compression.blocks_from": str(tmp_path / "nothing")})
    with pytest.raises(ValueError, match=r"compression.blocks_from='.*nothing'.*holds no finished blocks"):
        run(cfg)
    assert not cfg.run_dir.exists()
