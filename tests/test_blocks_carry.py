"""bench/blocks_carry.py: a run's compressed blocks packed into parts small enough to come back from the GPU
machine, unpacked into a folder that a real recovery run starts from (compression.blocks_from), every tensor
the same."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from .conftest import tiny_script_setup

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_packed_blocks_come_back_whole_and_a_recovery_starts_from_them(tmp_path, tiny_tokenizer):
    tiny = {"recovery.lora_r": 0, "recovery.train_norms": True}
    model_dir, config, env = tiny_script_setup(tmp_path, tiny_tokenizer, **tiny)
    common = [f"model.name={model_dir}", f"output_dir={tmp_path / 'runs'}", "data.num_teacher_samples=0"]
    done = _run("-m", "lit_cb.cli", "compress", "--config", str(config), "run_name=base", *common, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    base = tmp_path / "runs" / "base"

    done = _run("bench/blocks_carry.py", "pack", str(base), str(tmp_path / "out"), "--part-mib", "0.01")
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((tmp_path / "out" / "base.manifest.json").read_text())
    assert len(manifest["parts"]) > 1  # split at 10 KiB
    codes = [e for e in manifest["tensors"].values() if e["key"].endswith(".codes")]
    assert codes and all(e["bits"] == 4 for e in codes)  # the tiny config's 4-bit codes, packed at 4 bits
    assert manifest["bundle_bytes"] < sum(p.stat().st_size for p in (base / "blocks").glob("*.safetensors"))

    again = _run("bench/blocks_carry.py", "pack", str(base), str(tmp_path / "out"))
    assert again.returncode != 0 and "exists" in again.stderr  # nothing is overwritten

    carried = tmp_path / "carried" / "base"
    done = _run("bench/blocks_carry.py", "unpack", str(tmp_path / "out" / "base.manifest.json"), str(carried))
    assert done.returncode == 0, done.stderr[-3000:]
    for src in (base / "blocks").glob("block_*.safetensors"):
        a, b = load_file(str(src)), load_file(str(carried / "blocks" / src.name))
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() and a[k].dtype == b[k].dtype for k in a)
    assert (carried / "blocks" / "progress.json").read_text() == (base / "blocks" / "progress.json").read_text()

    # a damaged part is refused before anything is written
    part = tmp_path / "out" / manifest["parts"][0]["name"]
    part.write_bytes(b"x" + part.read_bytes()[1:])
    bad = _run("bench/blocks_carry.py", "unpack", str(tmp_path / "out" / "base.manifest.json"), str(tmp_path / "b2"))
    assert bad.returncode != 0 and "sha256" in bad.stderr and not (tmp_path / "b2").exists()

    done = _run(
        "-m", "lit_cb.cli", "recover", "--config", str(config), "run_name=rec", *common,
        "recovery.max_steps=2", f"compression.blocks_from={carried}", env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "runs" / "rec" / "metrics.json").read_text())
    assert metrics["stages"]["recover"]["steps"] == 2


@pytest.mark.parametrize("part_mib", ["0", "17"])
def test_pack_refuses_parts_that_cannot_come_back(tmp_path, part_mib):
    done = _run("bench/blocks_carry.py", "pack", str(tmp_path), str(tmp_path / "o"), "--part-mib", part_mib)
    assert done.returncode != 0 and f"--part-mib {float(part_mib)}" in done.stderr
