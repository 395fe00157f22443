"""Every issue-14 feature in one run, as `recipes/smollm2_codebook_best.py` combines them, on the tiny
model: concat calibration, a mixed-bits budget, teacher text, pure KL, code updates and held-out early
stopping. Each is tested alone elsewhere; this checks they work together, and that a run interrupted
mid-recovery resumes to the same model as an uninterrupted one (bit-identical on CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lit_cb.compress import bits_per_weight
from lit_cb.config import load_config
from lit_cb.pipeline import run
from lit_cb.serialization import load_compressed

from .conftest import TINY_RUN, tiny_llama

TOGETHER = {
    **TINY_RUN,
    "data.calibration_sampling": "concat",
    "data.num_teacher_samples": 2,
    "data.teacher_seqlen": 64,
    "compression.method_config": "{in_group_size: 4, nbits: 4, kmeans_iters: 2}",
    "compression.bit_budget": 1.6,
    "compression.bit_options": "[{nbits: 3}, {nbits: 4}, {nbits: 5}]",
    "recovery.max_steps": 8,
    "recovery.lora_r": 0,
    "recovery.train_codebooks": True,
    "recovery.train_norms": True,
    "recovery.codebook_lr": 0.001,
    "recovery.distill_alpha": 1.0,
    "recovery.code_update_every": 2,
    "recovery.code_update_fraction": 0.1,
    "recovery.val_every_n_steps": 2,
    "recovery.early_stop_patience": 2,
    "trainer.loggers": "[csv]",
    "eval.recovered": False,
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("model") / "tiny"
    tiny_llama(num_layers=2, vocab=len(tiny_tokenizer)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _cfg(model_dir: Path, out: Path, **extra):
    values = {**TOGETHER, "output_dir": str(out), "model.name": str(model_dir), **extra}
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


def test_all_features_in_one_run_and_its_resume(model_dir, tmp_path, monkeypatch):
    whole = _cfg(model_dir, tmp_path / "whole")
    metrics = run(whole)
    run_dir = whole.run_dir

    # Mixed bits within the budget, by the one counting function, on the saved model.
    model, _, _ = load_compressed(run_dir / "model")
    assert bits_per_weight(model)["compressed_linears"] <= 1.6
    allocation = json.loads((run_dir / "blocks" / "bit_allocation.json").read_text())
    assert len(set(allocation["choice"].values())) > 1, "the budget should mix the options"
    # Teacher text made and used; the curve recorded; code updates happened.
    assert (run_dir / "teacher_text" / "tokens.safetensors").is_file()
    curve = json.loads((run_dir / "recovery_curve.json").read_text())
    assert curve["points"], curve
    logs = (next((run_dir / "logs").rglob("metrics.csv"))).read_text()
    changed = [float(v) for v in _column(logs, "code_update_changed") if v]
    assert sum(changed) > 0, "no code changed in 8 steps with updates every 2"
    assert metrics["recovery_curve"]["best_step"] >= 1

    # The same run interrupted after step 5 (an exception inside training), then resumed.
    from lit_cb.recovery import RecoveryModule

    original = RecoveryModule.training_step
    calls = {"n": 0}

    def failing(self, batch, batch_idx):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("simulated crash")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(RecoveryModule, "training_step", failing)
    broken = _cfg(model_dir, tmp_path / "broken")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(broken)
    monkeypatch.setattr(RecoveryModule, "training_step", original)
    run(broken)

    a = load_file(str(run_dir / "model" / "model.safetensors"))
    b = load_file(str(broken.run_dir / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert json.loads((broken.run_dir / "recovery_curve.json").read_text())["points"] == curve["points"]


def _column(csv_text: str, name: str) -> list[str]:
    lines = csv_text.strip().splitlines()
    header = lines[0].split(",")
    if name not in header:
        return []
    i = header.index(name)
    return [row.split(",")[i] for row in lines[1:]]
