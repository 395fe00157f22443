"""bench/recovery_variants.sh, the next GPU session's driver: one compression, then several recoveries
started from its blocks. A real run of the script on the tiny model: every variant finishes from the
same compressed codes without compressing again, and each recovers its own way."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from safetensors.torch import load_file

from .conftest import tiny_script_setup

ROOT = Path(__file__).resolve().parents[1]


def test_variants_recover_one_compressed_model_their_own_ways(tmp_path, tiny_tokenizer):
    tiny = {"recovery.lora_r": 0, "recovery.train_codebooks": True, "recovery.train_norms": True}
    model_dir, config, env = tiny_script_setup(tmp_path, tiny_tokenizer, **tiny)
    runs = tmp_path / "runs"
    env.update(RUNS=str(runs), PARALLEL="2")
    common = f"model.name={model_dir} recovery.max_steps=3 data.num_teacher_samples=0"
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "recovery_variants.sh"), str(config), "1", common,
         "plain=", "ste=recovery.ste_codes=true recovery.latent_lr=0.3"],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # Two lanes: each variant's log, and its last line (the end) echoed when all are done.
    assert done.stdout.count("ended rc=0") == 2 and "rc=1" not in done.stdout, done.stdout
    assert "ended rc=0" in (runs / "ste_s1.log").read_text()
    blocks = sorted(p.name for p in (runs / "base_s1" / "blocks").glob("block_*.safetensors"))
    saved = {}
    for name in ("plain", "ste"):
        run_dir = runs / f"{name}_s1"
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["stages"]["recover"]["steps"] == 3, metrics["stages"]["recover"]
        for b in blocks:  # the base run's blocks, copied (same bytes, same mtime: not compressed again)
            src, dst = runs / "base_s1" / "blocks" / b, run_dir / "blocks" / b
            assert src.read_bytes() == dst.read_bytes() and src.stat().st_mtime_ns == dst.stat().st_mtime_ns
        saved[name] = load_file(str(run_dir / "model" / "model.safetensors"))
    codes = [k for k in saved["plain"] if k.endswith(".codes")]
    compressed = load_file(str(runs / "base_s1" / "model" / "model.safetensors"))
    assert all((saved["plain"][k] == compressed[k]).all() for k in codes), "frozen codes moved"
    assert any((saved["ste"][k] != compressed[k]).any() for k in codes), "ste_codes moved no code"
