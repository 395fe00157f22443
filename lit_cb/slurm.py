"""Running a recipe as a SLURM job: check the trainer against the allocation, and requeue on SIGUSR1.

SLURM sends SIGUSR1 before a time limit (``#SBATCH --signal=USR1@90``), a cluster that preempts
with a signal can send it, and so does ``scancel --signal=USR1 <job>``. Lightning's own SLURM
handler saves an HPC checkpoint and runs ``scontrol requeue`` from inside the signal handler, which
has two gaps for this pipeline:

* it is installed only when ``fit`` starts training, after ``CompressionCallback.setup`` has
  compressed the model, so a signal during loading, calibration or compression kills the task
  (SIGUSR1's default action) and the job ends FAILED instead of being requeued;
* under DDP it runs collectives (the barrier in ``Trainer.save_checkpoint``) at whatever point each
  rank happens to be when the signal lands, which can interleave with the gradient all-reduce.

:class:`SlurmRequeue` closes both, and reuses Lightning's pieces for the rest (its
``hpc_ckpt_<n>.ckpt`` naming and ``Trainer.save_checkpoint``). Lightning leaves an already
installed SIGUSR1 handler alone, so this one stays in charge for the whole run:

* outside training (loading, float eval, compression, final eval) the job is requeued at once.
  Nothing is lost that is not recomputed cheaply: finished blocks are already on disk
  (``outputs/<run>/blocks``), the block in progress is redone;
* during training the handler only sets a flag; after each batch the ranks agree on it (one
  all-reduce of one number), then all of them save the HPC checkpoint at the same step, rank 0
  requeues the job, and ``fit`` stops. The pipeline then returns without evaluating or saving.

The requeued job runs the same command; ``lit_cb.pipeline`` resumes from the newest of
``last.ckpt`` and the HPC checkpoints, so no finished block and no finished step is redone.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

REQUEUE_SIGNAL = signal.SIGUSR1


def in_slurm_step() -> bool:
    """True inside an ``srun`` step of a batch job, where Lightning picks its SLURMEnvironment
    (interactive allocations, job name ``bash``/``interactive``, are left alone as Lightning does)."""
    return "SLURM_NTASKS" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def slurm_job_id() -> str | None:
    """``<array job>_<task>`` for array jobs, else the job id (what ``scontrol requeue`` takes)."""
    array_id = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_id is not None:
        return f"{array_id}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def _tasks_per_node() -> int | None:
    # "2" or, with uneven nodes, "2(x3),1": Lightning only supports one value for every node.
    raw = os.environ.get("SLURM_NTASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE")
    if not raw:
        return None
    first = raw.split(",")[0].split("(")[0]
    return int(first) if first.isdigit() and "," not in raw else None


def check_trainer_matches_slurm(devices: int | str, num_nodes: int) -> None:
    """Fail before any work when ``trainer.devices``/``trainer.num_nodes`` do not match the srun step.

    Lightning checks the same thing when the Trainer is built, i.e. after the model was loaded and
    evaluated; this says it first and in terms of the recipe's config keys.
    """
    if not in_slurm_step():
        return
    ntasks = int(os.environ["SLURM_NTASKS"])
    nnodes = int(os.environ.get("SLURM_NNODES", os.environ.get("SLURM_JOB_NUM_NODES", "1")))
    per_node = _tasks_per_node()
    if per_node is None or per_node * nnodes != ntasks:
        if ntasks > 1:
            raise ValueError(
                f"this SLURM step runs {ntasks} tasks on {nnodes} node(s) without one --ntasks-per-node for every "
                "node; Lightning needs the same number of tasks on each node: submit with --nodes=N "
                "--ntasks-per-node=M and set trainer.num_nodes=N trainer.devices=M"
            )
        per_node = 1
    if isinstance(devices, str) and devices != "auto" or isinstance(devices, int) and devices != per_node:
        raise ValueError(
            f"trainer.devices={devices!r} but this SLURM step runs {per_node} task(s) per node "
            f"(--ntasks-per-node); one task per device: set trainer.devices={per_node}"
        )
    if num_nodes != nnodes:
        raise ValueError(
            f"trainer.num_nodes={num_nodes} but this SLURM step spans {nnodes} node(s) (--nodes); "
            f"set trainer.num_nodes={nnodes}"
        )


def requeue_job(job_id: str) -> bool:
    """``scontrol requeue <job>``; True when SLURM accepted it."""
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        rank_zero_warn(f"scontrol requeue {job_id} failed: {err}")
        return False
    if result.returncode != 0:
        rank_zero_warn(f"scontrol requeue {job_id} failed ({result.returncode}): {result.stderr.strip()}")
        return False
    return True


def _global_rank() -> int:
    return int(os.environ.get("SLURM_PROCID", "0"))


class SlurmRequeue(L.Callback):
    """Requeue the SLURM job on SIGUSR1 without losing finished blocks or steps (see the module doc).

    Create it (which installs the handler) at the very start of the run, before anything slow.
    ``requeued`` tells the caller, after ``fit`` returns, that the job was requeued and this
    process should exit without finishing the run.
    """

    def __init__(self, job_id: str | None = None, signum: int = REQUEUE_SIGNAL) -> None:
        super().__init__()
        self.job_id = job_id or slurm_job_id()
        if self.job_id is None:
            raise ValueError("SlurmRequeue needs a SLURM job (no SLURM_JOB_ID in the environment)")
        self.signum = signum
        self.requested = False  # a signal arrived (this rank)
        self.requeued = False  # the job was requeued: stop, do not finish the run
        self._in_training = False
        self._previous = signal.signal(signum, self._handle)

    def _handle(self, signum: int, _frame) -> None:
        print(
            f"[lit_cb] rank {_global_rank()}: signal {signum} (SLURM job {self.job_id}, "
            f"restart {os.environ.get('SLURM_RESTART_COUNT', '0')}), "
            + ("requeue after this step" if self._in_training else "requeue now"),
            flush=True,
        )
        if self._in_training:
            self.requested = True
        elif _global_rank() == 0 and not self.requeued:
            # Loading, compression or evaluation: no collective is safe from here, and there is no
            # Lightning state worth saving (finished blocks are on disk). Rank 0 asks SLURM, which
            # then ends every task; the requeued job redoes at most the block in progress.
            self.requeued = requeue_job(self.job_id)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._in_training = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._in_training = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        flag = torch.tensor(float(self.requested), device=trainer.strategy.root_device)
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce(flag, reduce_op="sum")
        if float(flag) == 0:
            return
        # Every rank is here at the same step: saving (which has barriers) is safe. Lightning's own
        # name and folder (default_root_dir), so `fit(ckpt_path="hpc")` would find it too.
        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        trainer.save_checkpoint(path)
        rank_zero_info(f"saved {path} at step {trainer.global_step}")
        # The requeue makes SLURM send SIGTERM at once. Lightning's SIGTERM handler broadcasts from
        # inside the handler, which collides with the collective below; the checkpoint is saved,
        # so let SIGTERM simply end the task.
        sigterm = signal.signal(signal.SIGTERM, signal.SIG_DFL)
        ok = requeue_job(self.job_id) if trainer.is_global_zero else True
        ok_t = torch.tensor(float(ok), device=trainer.strategy.root_device)
        if trainer.world_size > 1:
            ok_t = trainer.strategy.reduce(ok_t, reduce_op="min")
        self.requested = False
        if float(ok_t) > 0:
            self.requeued = True
            trainer.should_stop = True
            rank_zero_info(f"requeued SLURM job {self.job_id}; stopping at step {trainer.global_step}")
        else:
            signal.signal(signal.SIGTERM, sigterm)  # not requeued: train on, as before

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning restores this handler when fit ends; keep it for the evaluation that follows.
        self._in_training = False

    def close(self) -> None:
        """Give the signal back to whoever had it before."""
        signal.signal(self.signum, self._previous if self._previous is not None else signal.SIG_DFL)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest of ``checkpoints/last.ckpt`` and Lightning's ``hpc_ckpt_<n>.ckpt`` (written on
    requeue into the trainer's ``default_root_dir``, the run directory)."""
    run_dir = Path(run_dir)
    candidates = [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")]
    existing = [p for p in candidates if p.is_file()]
    if not existing:
        return None
    return max(existing, key=lambda p: (p.stat().st_mtime_ns, p.name))
