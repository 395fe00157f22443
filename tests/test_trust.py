"""Trustworthy runs and files (issue 13): resume bound to what made it, checksummed outputs, no
pickle, bad input refused before any work, and a resumed recovery equal to an uninterrupted one."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lit_cb.config import load_config
from lit_cb.pipeline import run
from lit_cb.serialization import load_compressed

from .conftest import tiny_llama

FAST = {
    "run_name": "tiny",
    "data.num_calibration_samples": 4,
    "data.calibration_seqlen": 32,
    "data.num_finetune_samples": 32,
    "data.finetune_seqlen": 32,
    "data.num_val_samples": 2,
    "data.eval_seqlen": 64,
    "data.max_eval_windows": 2,
    "data.batch_size": 4,
    "compression.method": "codebook",
    "compression.method_config": "{in_group_size: 4, nbits: 4, kmeans_iters: 2}",
    "compression.forward_batch_size": 4,
    "recovery.max_steps": 0,
    "recovery.lr": 0.01,
    "recovery.warmup_steps": 2,
    "recovery.lora_r": 4,
    "recovery.lora_on_compressed": True,
    "trainer.accelerator": "cpu",
    "trainer.log_every_n_steps": 1,
    "eval.float_model": False,
    "eval.compressed": False,
    "eval.recovered": False,
}


def _cfg(model_dir: Path, out: Path, **extra):
    values = {**FAST, "output_dir": str(out), "model.name": str(model_dir), **extra}
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


def _save_model(path: Path, tokenizer, seed: int = 0, hidden: int = 64, intermediate: int = 128) -> Path:
    model = tiny_llama(num_layers=2, vocab=len(tokenizer), seed=seed, hidden=hidden, intermediate=intermediate)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def model_dir(tmp_path, tiny_tokenizer):
    return _save_model(tmp_path / "tiny", tiny_tokenizer)


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# -- recovery resume ----------------------------------------------------------------------------


class _Crash(RuntimeError):
    pass


def test_recovery_resumed_after_a_crash_equals_an_uninterrupted_run(model_dir, tmp_path, monkeypatch):
    """A crash at step 14 (mid-epoch: 8 batches per epoch; periodic checkpoints every 5 steps),
    then a resume to step 20, gives bit-identical weights to 20 uninterrupted steps, with
    LoRA dropout on (the RNG stream is restored too)."""
    import lit_cb.recovery

    extra = {"recovery.max_steps": 20, "recovery.lora_dropout": 0.1}
    full = _cfg(model_dir, tmp_path / "a", **extra)
    run(full)

    original = lit_cb.recovery.RecoveryModule.training_step

    def crashing_step(self, batch, batch_idx):
        if self.trainer.global_step == 14:
            raise _Crash("simulated crash")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(lit_cb.recovery.RecoveryModule, "training_step", crashing_step)
    resumed = _cfg(model_dir, tmp_path / "b", **extra)
    with pytest.raises(_Crash):
        run(resumed)
    ckpt = torch.load(resumed.run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 14
    monkeypatch.setattr(lit_cb.recovery.RecoveryModule, "training_step", original)
    metrics = run(resumed)
    assert metrics["stages"]["recover"]["resumed_from"].endswith("last.ckpt")
    a = load_file(str(full.run_dir / "model" / "model.safetensors"))
    b = load_file(str(resumed.run_dir / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst == 0.0, f"resumed run differs from the uninterrupted one by up to {worst}"
