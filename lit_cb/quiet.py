"""Quiet by default: drop the known-harmless messages that bury a run's own output.

Only named messages are filtered, never whole categories: the Lightning ``litlogger``
advertisement, the ``datasets`` progress bars of reading the shipped texts, and warnings that say
nothing about the user's run (deprecations inside the libraries; Lightning's SLURM hint when a
machine has ``srun`` but the run is local). ``--verbose`` (:func:`configure` with
``verbose=True``) shows everything.
"""

from __future__ import annotations

import logging
import os
import warnings

# (message regex, category, module regex): each one a message lit_cb knows is harmless here.
HARMLESS_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # Lightning on a machine with SLURM tools installed but a run started without srun
    (r"The `srun` command is available on your system but is not used", Warning, ""),
    # `lit_cb compress` fits with recovery.max_steps=0 on purpose: no optimizer, no training batches
    (r".*configure_optimizers` returned `None`", Warning, ""),
    # deprecations inside the libraries, not in lit_cb's own calls
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning, ""),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", Warning, ""),
    (r"`torch\.jit\.script_method` is deprecated", DeprecationWarning, ""),
)
_LITLOGGER_TIP = "try installing [litlogger]"


class _DropLitLoggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _LITLOGGER_TIP not in record.getMessage()


_FILTER = _DropLitLoggerTip()


def configure(verbose: bool = False) -> None:
    """Install (or, with ``verbose``, leave out) the filters; idempotent."""
    if verbose:
        return
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    for message, category, module in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    # rank_zero_info logs through whichever of these rank_zero modules was imported last.
    for name in (
        "lightning.pytorch.utilities.rank_zero",
        "lightning.fabric.utilities.rank_zero",
        "lightning_utilities.core.rank_zero",
        "pytorch_lightning.utilities.rank_zero",
    ):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
