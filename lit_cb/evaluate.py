"""Perplexity by the GPTQ/AQLM protocol: the mean token negative log-likelihood over
non-overlapping windows of the whole evaluation text, exponentiated."""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics.text import Perplexity
from tqdm.auto import tqdm


def causal_lm_perplexity_update(metric: Perplexity, logits: torch.Tensor, input_ids: torch.Tensor) -> None:
    """Feed one batch to a torchmetrics ``Perplexity``: token t predicts token t+1."""
    metric.update(logits[:, :-1].float(), input_ids[:, 1:])


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool = True,
    desc: str = "perplexity",
) -> float:
    """Perplexity of ``model`` over ``windows`` ``[num_windows, seqlen]``."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    # Every caller passes all the windows, on one rank (rank 0 after training) or on each: never
    # sync with other ranks, which may not be evaluating at all.
    metric = Perplexity(sync_on_compute=False).to(device)
    was_training = model.training
    model.eval()
    starts = range(0, windows.shape[0], batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        causal_lm_perplexity_update(metric, logits, batch)
    model.train(was_training)
    return float(metric.compute())
