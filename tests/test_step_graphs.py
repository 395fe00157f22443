"""recovery.cuda_graphs (lit_cb/step_graphs.py) on the CPU: refused where it cannot work, before any work; the
plumbing around the captures (shapes, eager fallbacks, the self-check, the RNG, the embedding kept outside the
student's graph) with eager stand-ins for ``make_graphed_callables`` and ``torch.cuda.graph``, which need a GPU
(bench/recovery_graphs_bench.py runs the real ones); a Lightning fit through the stand-ins equals an eager fit."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch

from lit_cb.configs.recovery import RecoveryConfig
from lit_cb.configs.run import RunConfig, TrainerConfig
from lit_cb.recovery import RecoveryModule
from lit_cb.step_graphs import StepGraphs, StudentLogits
from tests.conftest import TokenWindows, tiny_llama


def eager_student(module, sample):
    """A stand-in capture: the module itself (what a faithful graph computes)."""
    assert isinstance(module, StudentLogits) and sample[0].dim() == 3  # embeddings in, not ids
    return module


def eager_teacher(forward, sample):
    return forward


def _trainable(model):
    for p in model.parameters():
        p.requires_grad_(False)
    for name, p in model.named_parameters():
        if "norm" in name or "embed" in name:
            p.requires_grad_(True)
    model.train()
    return model


def test_refused_before_any_work_where_it_cannot_run():
    with pytest.raises(ValueError, match="cuda_graphs=true with recovery.code_update_every=5"):
        RecoveryConfig(cuda_graphs=True, code_update_every=5)
    with pytest.raises(ValueError, match="ste_codes=True"):
        RecoveryConfig(cuda_graphs=True, ste_codes=True)
    with pytest.raises(ValueError, match="needs a GPU, but trainer.accelerator='cpu'"):
        RunConfig(recovery=RecoveryConfig(cuda_graphs=True), trainer=TrainerConfig(accelerator="cpu"))
    with pytest.raises(ValueError, match="trainer.devices=2 x trainer.num_nodes=1"):
        RunConfig(recovery=RecoveryConfig(cuda_graphs=True), trainer=TrainerConfig(accelerator="gpu", devices=2))
    with pytest.raises(ValueError, match="trainer.num_nodes=2"):
        RunConfig(recovery=RecoveryConfig(cuda_graphs=True), trainer=TrainerConfig(accelerator="gpu", num_nodes=2))
    RunConfig(recovery=RecoveryConfig(cuda_graphs=True), trainer=TrainerConfig(accelerator="gpu"))  # allowed
    with pytest.raises(ValueError, match="tolerance=0"):
        StepGraphs(tiny_llama(), None, tolerance=0)


def test_replays_at_the_captured_shape_and_runs_eagerly_otherwise():
    """The first training call captures at its shape (after an eager reference); calls of that shape replay, others
    and evaluation run eagerly; logits and gradients equal the eager model's; the RNG is left as it was."""
    model = _trainable(tiny_llama())
    ref_model = copy.deepcopy(model)
    logs = []
    graphs = StepGraphs(model, None, capture_student=eager_student, capture_teacher=eager_teacher, log=logs.append)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    out = graphs.student_logits(ids)
    assert torch.equal(torch.get_rng_state(), rng)  # the capture and its check drew nothing for good
    assert graphs.status.student == "on" and graphs.status.shape == [2, 16] and graphs.status.replays == 1
    assert graphs.status.check == {"logits": 0.0, "grads": 0.0} and "batch shape [2, 16]" in logs[-1]
    ref = ref_model(input_ids=ids).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    out.float().square().mean().backward()
    ref.float().square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=name)
    graphs.student_logits(ids[:, :8])
    assert graphs.status.eager == 1 and graphs.status.replays == 1
    with torch.no_grad():
        graphs.student_logits(ids)
    model.eval()
    graphs.student_logits(ids)
    assert graphs.status.eager == 1 and graphs.status.replays == 1  # evaluation is not a training call


def test_a_graph_that_differs_from_eager_is_not_used():
    """A capture whose replay is off by 10% fails the self-check: the status says by how much, and the step gets
    the eager logits from then on; a capture that raises is reported with its error, also eager."""
    model = _trainable(tiny_llama())
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    ref = copy.deepcopy(model)(input_ids=ids).logits

    def off_by_10_percent(module, sample):
        return lambda embeds: module(embeds) * 1.1

    logs = []
    graphs = StepGraphs(model, None, capture_student=off_by_10_percent, log=logs.append)
    out = graphs.student_logits(ids)
    assert graphs.status.student.startswith("off: self-check failed (differs from eager by 0.1")
    assert "training eagerly" in logs[0]
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(graphs.student_logits(ids), ref, rtol=0, atol=0)
    assert graphs.status.replays == 0

    def raises(module, sample):
        raise RuntimeError("operation not permitted when stream is capturing")

    graphs = StepGraphs(model, None, capture_student=raises, log=logs.append)
    torch.testing.assert_close(graphs.student_logits(ids), ref, rtol=0, atol=0)
    why = "off: capture failed (RuntimeError: operation not permitted when stream is capturing)"
    assert graphs.status.student == why
    assert "Traceback" in logs[-1]


def test_teacher_graph_replays_at_the_shape_and_is_checked():
    model, teacher = _trainable(tiny_llama()), tiny_llama(seed=1)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = teacher(input_ids=ids).logits
    seen = []

    def counting(forward, sample):
        return lambda x: seen.append(x.shape) or forward(x)

    graphs = StepGraphs(model, teacher, capture_student=eager_student, capture_teacher=counting, log=lambda m: None)
    torch.testing.assert_close(graphs.teacher_logits(ids), ref)  # before the first training call: eager
    assert seen == []
    graphs.student_logits(ids)
    assert graphs.status.teacher == "on" and graphs.status.check["teacher"] == 0.0
    torch.testing.assert_close(graphs.teacher_logits(ids), ref)
    graphs.teacher_logits(ids[:1])  # another shape: eager
    assert len(seen) == 2  # the self-check's replay and the one above

    bad = StepGraphs(
        model, teacher, capture_student=eager_student, capture_teacher=lambda f, s: (lambda x: f(x) + 1.0),
        log=lambda m: None,
    )  # fmt: skip
    bad.student_logits(ids)
    assert bad.status.teacher.startswith("off: self-check failed") and bad.status.student == "on"
    torch.testing.assert_close(bad.teacher_logits(ids), ref)


def _fit(graphs: bool, ids: torch.Tensor) -> RecoveryModule:
    L.seed_everything(0, verbose=False)
    student, teacher = tiny_llama(), tiny_llama(seed=1)
    cfg = RecoveryConfig(
        max_steps=3, lr=1e-2, warmup_steps=0, lora_r=2, train_norms=True, train_embeddings=True, embedding_lr=1e-2,
        distill_alpha=0.5,
    )  # fmt: skip
    module = RecoveryModule(student, cfg, teacher=teacher)
    if graphs:
        module.configure_model()
        module.step_graphs = StepGraphs(
            module.model, teacher, capture_student=eager_student, capture_teacher=eager_teacher, log=lambda m: None
        )
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, gradient_clip_val=1.0,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(TokenWindows(ids), batch_size=4))
    return module


def test_a_lightning_fit_through_the_graph_path_equals_the_eager_fit():
    """Three steps of LoRA + norms + a tied, trained embedding with KL from a teacher: the graph path (eager
    stand-ins) ends with the eager run's parameters; the last batch, shorter, ran eagerly."""
    ids = torch.randint(0, 512, (10, 16), generator=torch.Generator().manual_seed(3))  # batches of 4, 4, 2
    eager, graphed = _fit(False, ids), _fit(True, ids)
    status = graphed.step_graphs.status
    assert status.student == "on" and status.teacher == "on" and status.replays == 2 and status.eager == 1
    for (name, a), b in zip(eager.model.named_parameters(), graphed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_the_module_refuses_to_graph_on_a_cpu():
    module = RecoveryModule(tiny_llama(), RecoveryConfig(max_steps=1, lora_r=2, cuda_graphs=True))
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    ids = torch.randint(0, 512, (2, 16))
    with pytest.raises(ValueError, match="cuda_graphs=true needs a GPU; this run trains on cpu"):
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(TokenWindows(ids), batch_size=2))


def test_a_run_resumes_with_graphs_turned_on_or_off():
    """recovery.cuda_graphs changes how the step is launched, not what it computes (checked against eager at
    capture): a resume may toggle it; another recovery setting still counts as a different run."""
    from lit_cb.fingerprint import differences, flatten

    def fp(**recovery) -> dict:
        return {"config": flatten(RunConfig(recovery=RecoveryConfig(**recovery)).to_dict())}

    assert differences(fp(cuda_graphs=False), fp(cuda_graphs=True)) == []
    assert differences(fp(lr=1e-4), fp(lr=2e-4)) == ["config recovery.lr: 0.0001 -> 0.0002"]


def test_recovery_graphs_bench_runs_and_records(tmp_path):
    """bench/recovery_graphs_bench.py --smoke as a process: both variants through the Lightning Trainer, the graph
    path with eager stand-ins on and equal to eager step for step; --out never overwrites."""
    import json
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    out = tmp_path / "graphs.json"
    cmd = [sys.executable, "bench/recovery_graphs_bench.py", "--smoke", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert {"device", "versions", "date", "command", "variants", "speedup", "passed"} <= set(doc) and doc["passed"]
    eager, graphs = doc["variants"]["eager"], doc["variants"]["graphs"]
    assert len(eager["kl_per_step"]) == len(graphs["kl_per_step"]) == 3 and doc["kl_max_rel_diff"] == 0.0
    assert graphs["cuda_graphs"]["student"] == "on" and graphs["cuda_graphs"]["replays"] == 3
    again = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert again.returncode != 0 and "exists" in again.stderr
