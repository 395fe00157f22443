"""bench/seeds_pipelined.sh, the driver of a several-seed GPU session: seeds compressed one after
another, each recovered in the background from its own blocks. A real run of the script on the tiny
model, two seeds."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from lit_cb.config import load_config

from .conftest import tiny_script_setup

ROOT = Path(__file__).resolve().parents[1]


def test_seeds_compress_in_turn_and_recover_from_their_own_blocks(tmp_path, tiny_tokenizer):
    model_dir, config, env = tiny_script_setup(
        tmp_path, tiny_tokenizer, **{"recovery.lora_r": 0, "recovery.train_norms": True}
    )
    runs = tmp_path / "runs"
    env.update(RUNS=str(runs), BASE="cmp")
    common = f"model.name={model_dir} recovery.max_steps=2 data.num_teacher_samples=0"
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "seeds_pipelined.sh"), str(config), "1 2", "rec", common],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    # One compression after the other; seed 1's recovery starts before seed 2's compression.
    order = [out.index(s) for s in ("== compress cmp_s1", "== recover rec_s1 starts", "== compress cmp_s2")]
    assert order == sorted(order), out
    assert out.count("ended rc=0") == 2 and "failed" not in out, out
    for seed in (1, 2):
        run_dir = runs / f"rec_s{seed}"
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["stages"]["recover"]["steps"] == 2, metrics["stages"]
        cfg = load_config(run_dir / "run_config.yaml", [])
        assert cfg.seed == seed and cfg.data.seed == seed
        assert cfg.compression.blocks_from == str(runs / f"cmp_s{seed}")
        for src in (runs / f"cmp_s{seed}" / "blocks").glob("block_*.safetensors"):  # copied, not compressed again
            assert src.read_bytes() == (run_dir / "blocks" / src.name).read_bytes()
    blocks = [(runs / f"cmp_s{s}" / "blocks" / "block_000.safetensors").read_bytes() for s in (1, 2)]
    assert blocks[0] != blocks[1], "the two seeds compressed alike"
    # another recovery of seed 1: its blocks are there, so it is not compressed again
    again = subprocess.run(
        ["bash", str(ROOT / "bench" / "seeds_pipelined.sh"), str(config), "1", "rec2", common],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert again.returncode == 0 and "== blocks of cmp_s1 found" in again.stdout, again.stdout
    assert "== compress" not in again.stdout and again.stdout.count("ended rc=0") == 1, again.stdout
    assert json.loads((runs / "rec2_s1" / "metrics.json").read_text())["stages"]["recover"]["steps"] == 2


def test_compress_only_then_recover_next_session_reuses_blocks_and_teacher_text(tmp_path, tiny_tokenizer):
    """COMPRESS_ONLY=1 (a session whose budget holds the compressions, not the recoveries): every seed compressed,
    none recovered, the shared teacher text sampled once beside them. The next run of the script recovers every
    seed from those blocks and that text: nothing compressed or sampled again."""
    model_dir, config, env = tiny_script_setup(
        tmp_path, tiny_tokenizer, **{"recovery.lora_r": 0, "recovery.train_norms": True}
    )
    runs = tmp_path / "runs"
    env.update(RUNS=str(runs), BASE="cmp")
    common = (
        f"model.name={model_dir} recovery.max_steps=2 data.num_teacher_samples=4 data.teacher_seqlen=16 "
        "data.teacher_batch_size=2"
    )
    script = str(ROOT / "bench" / "seeds_pipelined.sh")
    first = subprocess.run(
        ["bash", script, str(config), "1 2", "rec", common],
        env={**env, "COMPRESS_ONLY": "1"}, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    out = first.stdout
    assert first.returncode == 0, out[-3000:] + first.stderr[-3000:]
    assert out.count("== compress cmp_s") == 2 and "== recover" not in out, out
    assert out.count("== teacher text for the seeds starts") == 1 and "== rec_teacher ended rc=0" in out, out
    assert not (runs / "rec_s1").exists() and not (runs / "rec_s2").exists()
    caches = [p.parent for p in (runs / "teacher_text").glob("*/tokens.safetensors")]
    assert len(caches) == 1, caches
    tokens = caches[0] / "tokens.safetensors"
    made = (tokens.read_bytes(), tokens.stat().st_mtime_ns)

    second = subprocess.run(
        ["bash", script, str(config), "1 2", "rec", common], env=env, capture_output=True, text=True, timeout=900
    )
    out = second.stdout
    assert second.returncode == 0, out[-3000:] + second.stderr[-3000:]
    assert "== compress" not in out and out.count("not compressed again") == 2, out
    assert out.count("ended rc=0") == 2, out
    assert (tokens.read_bytes(), tokens.stat().st_mtime_ns) == made, "the teacher text was sampled again"
    for seed in (1, 2):
        run_dir = runs / f"rec_s{seed}"
        assert json.loads((run_dir / "metrics.json").read_text())["stages"]["recover"]["steps"] == 2
        record = json.loads((run_dir / "teacher_text.json").read_text())
        assert Path(record["folder"]) == caches[0], record
