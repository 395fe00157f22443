"""Runs that share one GPU: compress side by side, then train one at a time (``trainer.train_lock``).

Compression of a small model is bound by launches and host syncs, not by the GPU: three SmolLM2-135M
runs side by side on one H200 compressed at 13.2 s per block each where one alone takes 15.7 s. The
recovery step is not: side by side each took 1.43 s per step, 2.1 steps/s in all, where one run
alone makes 3.1 (``bench/results/quality_attempt2_h200.json``). So a run given ``trainer.train_lock:
FILE`` compresses at once, and before its first recovery step waits for an exclusive ``fcntl.flock``
on FILE, held until training ends (or the process dies: the kernel releases the lock of a dead
process, so a killed run never blocks the others). While it waits it says which run holds the lock.

Single-process runs only: under DDP the ranks of one run would queue behind each other's collectives.
flock works on local file systems; on NFS it depends on the server's lock support.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


class TrainLock(L.Callback):
    """Hold an exclusive flock on ``path`` from the first training batch to the end of training."""

    def __init__(self, path: str | Path, run_dir: str | Path, poll_s: float = 5.0) -> None:
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"trainer.train_lock={str(path)!r} is a folder; give a file path")
        blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise ValueError(f"trainer.train_lock={str(path)!r}: {str(blocking)!r} is a file, not a folder")
        self.path, self.run_dir, self.poll_s = path, str(run_dir), poll_s
        self._fd: int | None = None
        self.waited_s = 0.0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:
            raise ValueError(
                f"trainer.train_lock is for single-process runs sharing a GPU; this run has {trainer.world_size} "
                "processes (set trainer.train_lock: null)"
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.acquire()

    def acquire(self) -> None:
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)  # e.g. under an output_dir not made yet
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        start = time.monotonic()
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told:
                    holder = self.path.read_text(errors="replace").strip() or "another run"
                    rank_zero_info(f"recovery waits for {self.path} (held by {holder})")
                    told = True
                time.sleep(self.poll_s)
        self.waited_s = time.monotonic() - start
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {self.run_dir}\n".encode(), 0)
        self._fd = fd
        if told:
            rank_zero_info(f"recovery got {self.path} after {self.waited_s:.0f} s")

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.release()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.release()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.release()
