"""A real two-node SLURM cluster on this host (scripts/slurm_local.sh): the repo's CPU sbatch script
runs compression + recovery with one task per node (Lightning DDP over gloo), matches a single
process run of the same config, and survives SIGUSR1 (requeue) during compression and training.

Needs root (the script starts munged, slurmctld and two slurmd). If the cluster cannot start, the
tests fail with the daemons' logs: they are never skipped.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lit_cb.slurm import check_trainer_matches_slurm, latest_checkpoint

from .conftest import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2_codebook.py"
CPU_SBATCH = ROOT / "slurm" / "compress_recover_cpu.sbatch"
MAX_STEPS = 16
NUM_LAYERS = 2


def _sh(*cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def slurm_cluster():
    """Start (or find running) the local two-node cluster; a failure is a test failure with logs."""
    res = _sh("bash", str(ROOT / "scripts" / "slurm_local.sh"), "start", timeout=600)
    if res.returncode != 0:
        pytest.fail(f"the local SLURM cluster did not start:\n{res.stdout}\n{res.stderr}", pytrace=False)
    info = _sh("sinfo", "-h", "-N", "-o", "%N %t")
    nodes = dict(line.split() for line in info.stdout.strip().splitlines())
    assert len(nodes) >= 2 and all(s in ("idle", "mix", "alloc") for s in nodes.values()), info.stdout
    return nodes


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("slurm_model") / "tiny"
    model = tiny_llama(num_layers=NUM_LAYERS, vocab=len(tiny_tokenizer))
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _overrides(model_dir: Path, out: Path) -> list[str]:
    values = {
        "run_name": "tiny",
        "output_dir": str(out),
        "model.name": str(model_dir),
        "data.num_calibration_samples": 8,
        "data.calibration_seqlen": 32,
        "data.num_finetune_samples": 64,
        "data.finetune_seqlen": 32,
        "data.num_val_samples": 2,
        "data.eval_seqlen": 64,
        "data.max_eval_windows": 2,
        "data.batch_size": 4,
        "compression.method": "codebook",
        "compression.method_config.in_group_size": 4,
        "compression.method_config.nbits": 4,
        "compression.method_config.kmeans_iters": 3,
        "compression.forward_batch_size": 4,
        "recovery.max_steps": MAX_STEPS,
        "recovery.lr": 0.01,
        "recovery.warmup_steps": 2,
        "recovery.lora_r": 4,
        "trainer.log_every_n_steps": 1,
        "eval.float_model": False,
    }
    return [f"{k}={v}" for k, v in values.items()]


def _sbatch(workdir: Path, overrides: list[str], wait: bool) -> tuple[str, subprocess.CompletedProcess]:
    """Submit the repo's CPU script as CI and developers do: 2 nodes x 1 task, this Python."""
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [
        "sbatch",
        "--parsable",
        f"--export=ALL,LIT_CB_PYTHON={sys.executable}",
        f"--chdir={workdir}",
        f"--output={workdir}/job-%j.out",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--cpus-per-task=1",
        "--time=15",  # a hung job ends instead of hanging CI
        *(["--wait"] if wait else []),
        str(CPU_SBATCH),
        str(RECIPE),
        *overrides,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    job_id = res.stdout.strip().split(";")[0].splitlines()[0] if res.stdout.strip() else ""
    return job_id, res


def _job_output(workdir: Path, job_id: str) -> str:
    path = workdir / f"job-{job_id}.out"
    return path.read_text(errors="replace") if path.is_file() else f"(no {path})"


def _job_info(job_id: str) -> dict[str, str]:
    out = _sh("scontrol", "show", "job", "-o", job_id).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _wait_job_end(job_id: str, timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = _job_info(job_id)
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return info
        time.sleep(1.0)
    _sh("scancel", job_id)
    raise AssertionError(f"job {job_id} did not end within {timeout}s: {_job_info(job_id)}")


def _wait_for(predicate, what: str, job_id: str, workdir: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        state = _job_info(job_id).get("JobState")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            break
        time.sleep(0.05)
    _sh("scancel", job_id)
    raise AssertionError(f"job {job_id}: {what} did not happen:\n{_job_output(workdir, job_id)[-6000:]}")


def _blocks(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(str(p)) for p in sorted((run_dir / "blocks").glob("block_*.safetensors"))}


def _train_steps_and_losses(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    rows = {}
    for path in sorted(run_dir.glob("logs/version_*/metrics.csv")):
        with open(path) as f:
            rows[path.parent.name] = [
                (int(r["step"]), float(r["train_loss"])) for r in csv.DictReader(f) if r.get("train_loss")
            ]
    return rows


@pytest.fixture(scope="module")
def uninterrupted_job(slurm_cluster, model_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("slurm_job")
    job_id, res = _sbatch(workdir, _overrides(model_dir, workdir / "out"), wait=True)
    output = _job_output(workdir, job_id)
    assert res.returncode == 0, f"sbatch --wait failed ({res.returncode}): {res.stderr}\n{output[-8000:]}"
    return {"job_id": job_id, "run_dir": workdir / "out" / "tiny", "output": output, "info": _job_info(job_id)}


@pytest.fixture(scope="module")
def single_process_blocks(model_dir, tmp_path_factory):
    """The same config compressed in this process, on all the calibration windows at once."""
    import lightning as L

    from lit_cb.compress import compress_model
    from lit_cb.config import load_config
    from lit_cb.data import CompressionDataModule
    from lit_cb.models import load_model

    out = tmp_path_factory.mktemp("single")
    cfg = load_config(ROOT / "configs" / "smollm2_codebook.yaml", _overrides(model_dir, out))
    L.seed_everything(cfg.seed)
    model, tokenizer = load_model(cfg.model.name, cfg.model.dtype)
    windows = CompressionDataModule(tokenizer, cfg.data).calibration_windows()
    compress_model(model, windows, cfg.compression, device="cpu", resume_dir=out / "tiny" / "blocks", progress=False)
    return out / "tiny"


def test_cpu_sbatch_on_two_nodes_matches_one_process_and_recovers(uninterrupted_job, single_process_blocks):
    info, run_dir = uninterrupted_job["info"], uninterrupted_job["run_dir"]
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
    assert info["NumNodes"] == "2" and info["NumTasks"] == "2", info
    assert "Starting with 2 processes" in uninterrupted_job["output"]
    assert "distributed_backend=gloo" in uninterrupted_job["output"]

    # Each rank calibrated on half of the windows; the all-reduced Hessians make the compression
    # that of one process on all windows. The two differ only in float32 rounding (the Hessian sums
    # and block forwards are added in another order and batch shape: ~1e-7 relative; the per-layer
    # relative errors below agree to ~1e-6). Every step after is continuous in H except the
    # nearest-centroid choice, so codes must be identical; codebooks and scales are stored in fp16,
    # where a 1e-7 difference can flip one rounding: they must agree to one fp16 ulp (2^-10 relative),
    # and only in a few entries. float32 tensors (norms) to 1e-5.
    job_blocks, ref_blocks = _blocks(run_dir), _blocks(single_process_blocks)
    assert len(job_blocks) == NUM_LAYERS and job_blocks.keys() == ref_blocks.keys()
    n_codes = n_fp16 = n_fp16_differ = 0
    for name, tensors in job_blocks.items():
        ref = ref_blocks[name]
        assert tensors.keys() == ref.keys(), name
        for key, t in tensors.items():
            where = f"{name}:{key}"
            if t.dtype == torch.float16:
                torch.testing.assert_close(t.float(), ref[key].float(), rtol=2**-10, atol=2**-24, msg=where)
                n_fp16 += t.numel()
                n_fp16_differ += int((t != ref[key]).sum())
            elif t.dtype.is_floating_point:
                torch.testing.assert_close(t, ref[key], rtol=1e-5, atol=1e-6, msg=where)
            else:
                assert torch.equal(t, ref[key]), f"{where}: codes differ from the single-process run"
                n_codes += key.endswith("codes")
    assert n_fp16_differ <= 0.01 * n_fp16, f"{n_fp16_differ} of {n_fp16} fp16 values differ"
    assert n_codes == 7 * NUM_LAYERS
    job_progress = json.loads((run_dir / "blocks" / "progress.json").read_text())
    ref_progress = json.loads((single_process_blocks / "blocks" / "progress.json").read_text())
    for i in range(NUM_LAYERS):
        job_err = {r["name"]: r["relative_error"] for r in job_progress["blocks"][str(i)]["layers"]}
        ref_err = {r["name"]: r["relative_error"] for r in ref_progress["blocks"][str(i)]["layers"]}
        assert job_err.keys() == ref_err.keys()
        for name in job_err:
            assert job_err[name] == pytest.approx(ref_err[name], rel=1e-5), name

    # Recovery under DDP lowered the training loss and the perplexity.
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["stages"]["recover"]["steps"] == MAX_STEPS
    assert metrics["wikitext2_ppl"]["recovered"] < metrics["wikitext2_ppl"]["compressed"]
    (losses,) = _train_steps_and_losses(run_dir).values()
    assert [s for s, _ in losses] == list(range(MAX_STEPS))
    first, last = [v for _, v in losses[:4]], [v for _, v in losses[-4:]]
    assert sum(last) < sum(first)
    assert (run_dir / "model" / "compression.json").is_file()


def test_sigusr1_requeues_and_resumes_without_redoing_blocks_or_steps(
    slurm_cluster, model_dir, uninterrupted_job, tmp_path
):
    workdir = tmp_path / "job"
    run_dir = workdir / "out" / "tiny"
    job_id, res = _sbatch(workdir, _overrides(model_dir, workdir / "out"), wait=False)
    assert res.returncode == 0 and job_id.isdigit(), res.stderr
    progress = run_dir / "blocks" / "progress.json"

    def finished_blocks() -> dict:
        try:
            return json.loads(progress.read_text())["blocks"]
        except (OSError, ValueError):
            return {}

    # 1. During compression: once block 0 is on disk, SIGUSR1 requeues the job at once.
    _wait_for(lambda: "0" in finished_blocks(), "block 0 finished", job_id, workdir)
    assert _sh("scancel", "--signal=USR1", job_id).returncode == 0
    _wait_for(lambda: _job_info(job_id).get("Restarts") == "1", "the first requeue", job_id, workdir, 120)
    # The first run is gone (the job waits to start again): what it finished is on disk.
    done_at_signal = {p.name: p.stat().st_mtime_ns for p in (run_dir / "blocks").glob("block_*.safetensors")}

    # 2. During training of the requeued run: once a checkpoint exists, SIGUSR1 saves an HPC
    #    checkpoint at the next step on every rank, requeues, and the third run resumes from it.
    last = run_dir / "checkpoints" / "last.ckpt"
    _wait_for(lambda: last.is_file() and _job_info(job_id).get("JobState") == "RUNNING", "last.ckpt", job_id, workdir)
    assert _sh("scancel", "--signal=USR1", job_id).returncode == 0
    _wait_for(lambda: _job_info(job_id).get("Restarts") == "2", "the second requeue", job_id, workdir, 120)
    info = _wait_job_end(job_id, 600)
    output = _job_output(workdir, job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", output[-8000:]

    # What each run did, from the job's (appended) output.
    assert re.search(r"rank 0: signal 10 .*restart 0\), requeue now", output), output[-6000:]
    assert re.search(r"rank 0: signal 10 .*restart 1\), requeue after this step", output), output[-6000:]
    assert "restart 2 on" in output
    # Blocks finished before the first signal were restored, not recomputed: same files, same mtime.
    assert "block_000.safetensors" in done_at_signal
    for name, mtime in done_at_signal.items():
        assert (run_dir / "blocks" / name).stat().st_mtime_ns == mtime, f"{name} was written again"
    assert re.search(r"block 0 restored from", output), "the requeued run did not restore block 0"

    # Training resumed from the HPC checkpoint, after its step: no step ran twice after the save.
    (hpc,) = run_dir.glob("hpc_ckpt_*.ckpt")
    hpc_step = torch.load(hpc, map_location="cpu", weights_only=False)["global_step"]
    assert 0 < hpc_step < MAX_STEPS
    metrics = json.loads((run_dir / "metrics.json").read_text())
    resumed_from = metrics["stages"]["recover"]["resumed_from"]
    # The HPC checkpoint, or last.ckpt when ModelCheckpoint saved it at that same step, just after it
    # (its step is checked below by the steps the last run trained: last.ckpt itself has since been
    # overwritten by that run, so its step now is the final one).
    assert resumed_from in (str(hpc), str(last)), resumed_from
    assert metrics["stages"]["recover"]["steps"] == MAX_STEPS
    runs = _train_steps_and_losses(run_dir)
    final_steps = [s for s, _ in runs[max(runs, key=lambda v: int(v.split("_")[1]))]]
    assert final_steps == list(range(hpc_step, MAX_STEPS)), runs.keys()

    # The requeued job ends with exactly the compressed tensors of the uninterrupted job.
    interrupted, reference = _blocks(run_dir), _blocks(uninterrupted_job["run_dir"])
    assert interrupted.keys() == reference.keys()
    for name, tensors in interrupted.items():
        for key, t in tensors.items():
            assert torch.equal(t, reference[name][key]), f"{name}:{key} differs from the uninterrupted run"


def test_srun_with_a_mismatched_trainer_fails_before_loading(slurm_cluster, model_dir, tmp_path):
    """The recipe run straight under srun (2 nodes x 1 task) with trainer.devices=2: a clear error
    naming the key, from every task, before the model is loaded (no run directory content)."""
    out = tmp_path / "out"
    res = subprocess.run(
        ["srun", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=5", f"--chdir={tmp_path}",
         sys.executable, str(RECIPE), *_overrides(model_dir, out), "trainer.accelerator=cpu",
         "trainer.num_nodes=2", "trainer.devices=2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode != 0
    assert res.stderr.count("trainer.devices=2 but this SLURM step runs 1 task(s) per node") == 2, res.stderr[-4000:]
    assert not (out / "tiny" / "run_config.yaml").exists()


def test_trainer_topology_must_match_the_srun_step(monkeypatch):
    env = {"SLURM_NTASKS": "4", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NAME": "x"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    check_trainer_matches_slurm(2, 2)
    with pytest.raises(ValueError, match=r"trainer.devices=1 .* 2 task\(s\) per node.*trainer.devices=2"):
        check_trainer_matches_slurm(1, 2)
    with pytest.raises(ValueError, match=r"trainer.num_nodes=1 .* 2 node\(s\).*trainer.num_nodes=2"):
        check_trainer_matches_slurm(2, 1)
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE")
    with pytest.raises(ValueError, match="--ntasks-per-node"):
        check_trainer_matches_slurm(2, 2)
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # salloc shells are not srun steps
    check_trainer_matches_slurm(1, 1)
    for k in env:
        monkeypatch.delenv(k, raising=False)
    check_trainer_matches_slurm(1, 1)


def test_latest_checkpoint_prefers_the_newest(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.write_text("a")
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    hpc.write_text("b")
    os.utime(last, ns=(1_000_000_000, 1_000_000_000))
    assert latest_checkpoint(tmp_path) == hpc
    os.utime(hpc, ns=(500_000_000, 500_000_000))
    assert latest_checkpoint(tmp_path) == last
