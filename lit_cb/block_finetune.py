"""Block-wise fine-tuning after a transformer block's linears were replaced by :class:`CodebookLinear`.

Quantizing each linear in isolation ignores how errors compound through attention, the MLP and
the residual stream. Once all linears of a block are quantized, this module trains the block's
continuous compressed parameters (codebooks, scales, norm weights and optionally biases; codes
stay frozen) so the quantized block's outputs match the float block's outputs on the
calibration inputs (AQLM, Egiazarian et al., 2024, Sec. 3.4). It is method-agnostic: any block
whose compressed layers are :class:`CodebookLinear` works (LLM-Codebook and AQLM alike).

Training always runs in float32 (the block is cast up and back), because fp16 Adam updates on
codebooks would round away; a held-out slice of the calibration samples drives early stopping
and the best state (by held-out loss, the untrained state included) is what the block keeps.

Under torch.distributed the fine-tuning is data-parallel: each rank holds its shard of the samples
(global sample ``g`` on rank ``g % world_size``, as ``CompressionDataModule.calibration_windows``
shards them), every rank draws the same global train/held-out split and mini-batch order, computes
the gradient of its part of each global mini-batch (weighted by its share of the samples), and the
gradients are summed across ranks before every optimizer step, so every rank takes the step one
process would take on the whole mini-batch. Held-out and training losses are sums reduced across
ranks, so early stopping decides alike everywhere.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lit_cb import distributed as D
from lit_cb.configs.block_finetune import BlockFinetuneConfig  # noqa: F401 (re-exported: the config lives torch-free)
from lit_cb.layers import CompressedLinear

log = logging.getLogger(__name__)


def _is_norm(module: nn.Module) -> bool:
    # LlamaRMSNorm, Qwen2RMSNorm, nn.LayerNorm, nn.RMSNorm, ...: matched by name so that every
    # architecture's own norm class qualifies without importing it.
    return "norm" in type(module).__name__.lower()


def trainable_parameters(block: nn.Module, config: BlockFinetuneConfig) -> list[tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs block fine-tuning trains: codebooks and scales of every
    :class:`CodebookLinear`, norm weights (``train_norms``) and CodebookLinear biases
    (``train_biases``). Codes are buffers, so they can never be among them."""
    chosen: dict[int, tuple[str, nn.Parameter]] = {}
    for mod_name, module in block.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(module, CompressedLinear):
            names = [*module.quant_parameter_names] + (["bias"] if config.train_biases else [])
            for name in names:
                param = getattr(module, name, None)
                if isinstance(param, nn.Parameter):
                    chosen.setdefault(id(param), (prefix + name, param))
        elif config.train_norms and _is_norm(module):
            for name, param in module.named_parameters(recurse=False):
                chosen.setdefault(id(param), (prefix + name, param))
    return list(chosen.values())


def _batch_value(value: Any, index: torch.Tensor, num_samples: int, device: torch.device) -> Any:
    """Move a forward kwarg to the block's device as float32 (floating tensors only); tensors
    whose leading dim is the sample count are sliced to the mini-batch, others broadcast."""
    if isinstance(value, torch.Tensor):
        if num_samples > 1 and value.dim() > 0 and value.shape[0] == num_samples:
            value = value[index.to(value.device)]
        value = value.to(device)
        return value.float() if value.is_floating_point() else value
    if isinstance(value, tuple | list):
        return type(value)(_batch_value(v, index, num_samples, device) for v in value)
    return value


def _forward(block: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Block output as a tensor: HF decoder layers return a tensor (transformers >= 4.54) or a
    tuple whose first element is the hidden state (older versions)."""
    out = block(x, **kwargs)
    if isinstance(out, tuple | list):
        out = out[0]
    return out


def _global_sums(values: list[float], device: torch.device) -> list[float]:
    """Sum floats over ranks (float64), then take rank 0's result, so that every rank holds the
    very same numbers and early stopping cannot branch differently."""
    if not D.is_distributed():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    D.all_reduce_sum_([t])
    D.broadcast_tensor(t, src=0)
    return t.tolist()


class _Shard:
    """Global sample indices -> this rank's local ones (global ``g`` is local ``g // world`` on
    rank ``g % world``)."""

    def __init__(self, num_local: int, device: torch.device) -> None:
        self.world, self.rank = D.world_size(), D.rank()
        counts = [num_local]
        if self.world > 1:
            t = torch.zeros(self.world, dtype=torch.int64, device=device)
            t[self.rank] = num_local
            D.all_reduce_sum_([t])
            counts = t.tolist()
        self.num_global = sum(counts)
        expected = [len(range(r, self.num_global, self.world)) for r in range(self.world)]
        if counts != expected:
            raise ValueError(
                f"block fine-tuning under torch.distributed needs rank r to hold samples r, r+W, r+2W, ... "
                f"(W={self.world}); the ranks hold {counts} samples, strided shards of {self.num_global} "
                f"would be {expected}"
            )

    def local(self, indices: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return indices
        return indices[indices % self.world == self.rank] // self.world


def _mean_loss(
    block: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    forward_kwargs: dict,
    indices: torch.Tensor,
    batch_size: int,
    device: torch.device,
    shard: _Shard | None = None,
) -> float:
    """MSE over the global ``indices`` (weighted by batch size so it equals the MSE over all of
    them); each rank evaluates the ones it holds and the sums are reduced across ranks."""
    if indices.numel() == 0:
        return math.nan
    local = shard.local(indices) if shard is not None else indices
    total = 0.0
    with torch.no_grad():
        for start in range(0, local.numel(), batch_size):
            idx = local[start : start + batch_size]
            kw = {k: _batch_value(v, idx, inputs.shape[0], device) for k, v in forward_kwargs.items()}
            x = inputs[idx.to(inputs.device)].to(device, torch.float32)
            y = targets[idx.to(targets.device)].to(device, torch.float32)
            total += float(F.mse_loss(_forward(block, x, kw), y, reduction="sum"))
    (total,) = _global_sums([total], device)
    return total / (indices.numel() * math.prod(inputs.shape[1:]))


def _all_reduce_grads(params: list[nn.Parameter]) -> None:
    """Sum the gradients over ranks (one flat float32 buffer; a rank with no sample in the
    mini-batch contributes zeros)."""
    if not D.is_distributed():
        return
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    D.all_reduce_sum_(grads)


def _snapshot(params: Iterable[nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def finetune_block(
    block: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    forward_kwargs: dict | None = None,
    config: BlockFinetuneConfig | None = None,
) -> dict[str, Any]:
    """Train ``block``'s codebooks, scales (and norm weights / biases) in place so that
    ``block(inputs, **forward_kwargs)`` matches ``targets`` (the float block's outputs).

    ``inputs``/``targets``: ``[n, seq, hidden]`` (any device; mini-batches are moved to the
    block's device). ``forward_kwargs``: extra arguments of the block's forward, e.g. a HF
    decoder layer's ``position_embeddings=(cos, sin)`` and ``attention_mask``; tensors whose
    first dim equals ``n`` are sliced per mini-batch, others (batch 1) broadcast.

    Afterwards the block has its original dtypes, the trained parameters have
    ``requires_grad=False``, all other parameters their original flag, and the block holds the
    state with the best held-out loss (the untrained state included). Returns losses (MSE),
    epochs run, the best epoch (0 = untrained state kept) and sizes.

    Under torch.distributed ``inputs``/``targets`` are this rank's strided shard and training is
    data-parallel (module docstring); sizes and losses in the result are global. Against one
    process on all samples the only difference is summation order: each mini-batch's gradient is
    summed per rank, then across ranks (float32, ~1e-7 relative per step, which Adam's
    normalisation can amplify where a gradient entry is near zero). On the tiny test block (CPU,
    2 gloo ranks, mini-batches of 2 split 1 + 1) the result was bit-identical to one process.
    """
    config = config or BlockFinetuneConfig()
    forward_kwargs = dict(forward_kwargs or {})
    if inputs.dim() != 3 or tuple(inputs.shape) != tuple(targets.shape):
        raise ValueError(
            f"inputs and targets must both be [n, seq, hidden]; got {tuple(inputs.shape)} and {tuple(targets.shape)}"
        )
    start_time = time.perf_counter()
    num_samples = inputs.shape[0]  # on this rank
    first = next(iter(block.parameters()), None)
    device = first.device if first is not None else inputs.device
    shard = _Shard(num_samples, device)
    num_global = shard.num_global

    gen = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(num_global, generator=gen)
    num_val = 0
    if config.val_fraction > 0 and num_global >= 2:
        num_val = min(num_global - 1, max(1, round(num_global * config.val_fraction)))
    val_idx, train_idx = order[:num_val], order[num_val:]

    named = trainable_parameters(block, config)
    params = [p for _, p in named]
    # Remember everything we touch so the block leaves exactly as it came (but trained).
    saved_flags = {id(p): p.requires_grad for p in block.parameters()}
    saved_dtypes = [(t, t.dtype) for t in _floating_tensors(block)]
    saved_training = block.training
    kernel_flags = [(m, m.use_kernels) for m in block.modules() if isinstance(m, CompressedLinear)]
    try:
        for p in block.parameters():
            p.requires_grad_(False)
        for t, _ in saved_dtypes:
            t.data = t.data.float()
        for m, _ in kernel_flags:
            m.use_kernels = False  # the reference path is differentiable in codebooks and scales
        block.eval()  # no dropout: targets were produced deterministically

        def evaluate(indices: torch.Tensor) -> float:
            return _mean_loss(block, inputs, targets, forward_kwargs, indices, config.batch_size, device, shard)

        initial_train, initial_val = evaluate(train_idx), evaluate(val_idx)
        best_val, best_epoch, best_state = initial_val, 0, _snapshot(params)
        history: list[dict[str, float]] = []
        epochs_run, bad_epochs = 0, 0
        if params and config.epochs > 0:
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.Adam(params, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2))
            for epoch in range(1, config.epochs + 1):
                perm = train_idx[torch.randperm(train_idx.numel(), generator=gen)]
                running, seen = 0.0, 0
                for start in range(0, perm.numel(), config.batch_size):
                    global_idx = perm[start : start + config.batch_size]
                    idx = shard.local(global_idx)
                    opt.zero_grad(set_to_none=True)
                    if idx.numel():
                        kw = {k: _batch_value(v, idx, num_samples, device) for k, v in forward_kwargs.items()}
                        x = inputs[idx.to(inputs.device)].to(device, torch.float32)
                        y = targets[idx.to(targets.device)].to(device, torch.float32)
                        with torch.enable_grad():
                            loss = F.mse_loss(_forward(block, x, kw), y)
                            if shard.world > 1:
                                # This rank's share of the global mini-batch mean; summed over ranks below.
                                loss = loss * (idx.numel() / global_idx.numel())
                            loss.backward()
                        running += float(loss.detach()) * global_idx.numel()
                    _all_reduce_grads(params)
                    opt.step()
                    seen += global_idx.numel()
                (running,) = _global_sums([running], device)
                epochs_run = epoch
                val = evaluate(val_idx) if num_val else math.nan
                history.append({"epoch": epoch, "train_loss": running / max(seen, 1), "val_loss": val})
                log.debug("block finetune epoch %d: train %.4g val %.4g", epoch, running / max(seen, 1), val)
                if num_val == 0:
                    best_epoch, best_state = epoch, _snapshot(params)
                    continue
                if val < best_val * (1 - config.relative_tol):
                    best_val, best_epoch, best_state, bad_epochs = val, epoch, _snapshot(params), 0
                else:
                    bad_epochs += 1
                    if bad_epochs >= config.patience:
                        break
            with torch.no_grad():
                for p, best in zip(params, best_state, strict=True):
                    p.copy_(best)
        final_train, final_val = evaluate(train_idx), evaluate(val_idx)
    finally:
        for t, dtype in saved_dtypes:
            t.data = t.data.to(dtype)
        for m, flag in kernel_flags:
            m.use_kernels = flag
        for p in block.parameters():
            p.requires_grad_(saved_flags.get(id(p), False))
        for p in params:
            p.requires_grad_(False)
        block.train(saved_training)
    return {
        "initial_train_loss": initial_train,
        "initial_val_loss": initial_val,
        "final_train_loss": final_train,
        "final_val_loss": final_val,
        "best_epoch": best_epoch,
        "epochs": epochs_run,
        "history": history,
        "num_train": int(train_idx.numel()),
        "world_size": shard.world,
        "num_val": num_val,
        "num_trainable_params": sum(p.numel() for p in params),
        "trainable": [name for name, _ in named],
        "seconds": time.perf_counter() - start_time,
    }


def _floating_tensors(block: nn.Module) -> list[torch.Tensor]:
    """Every floating parameter and buffer of the block, once each."""
    seen: dict[int, torch.Tensor] = {}
    for t in list(block.parameters()) + list(block.buffers()):
        if t.is_floating_point():
            seen.setdefault(id(t), t)
    return list(seen.values())


__all__ = ["BlockFinetuneConfig", "finetune_block", "trainable_parameters"]
