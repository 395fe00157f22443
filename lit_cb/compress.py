"""Sequential, block-by-block compression of a causal LM (GPTQ/AQLM order).

Block i is calibrated on the outputs of the already-compressed blocks before it, so each block
learns to correct the error that reaches it. Inside a block, linears are compressed group by
group in execution order (q/k/v, then o, then gate/up, then down), re-collecting the Hessians
after each group ("true sequential"). Optionally each block's trainable codebook parameters are
then fine-tuned against the float block's outputs.

A finished block is written to ``resume_dir`` at once, so an interrupted run resumes from the last
finished block (re-running the finished blocks forward only), and nothing computed is lost.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from lit_cb.configs.compression import (  # noqa: F401 (re-exported: the config lives torch-free)
    DEFAULT_TARGETS,
    CompressionConfig,
)
from lit_cb.hessian import HESSIAN_DTYPES, attach_hessian_hooks, remove_hooks
from lit_cb.models import decoder_layers
from lit_cb.quant import registry
from lit_cb.quant.objective import relative_layer_error
from lit_cb.serialization import build_module, module_spec


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    relative_error: float
    bits_per_weight: float
    seconds: float


@dataclass
class CompressionReport:
    layers: list[LayerReport] = field(default_factory=list)
    kept_dense: list[str] = field(default_factory=list)
    block_finetune: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class _StopForward(Exception):
    pass


def _block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def capture_block_inputs(
    model: nn.Module, windows: torch.Tensor, device: torch.device, store_device: torch.device
) -> tuple[torch.Tensor, dict]:
    """Hidden states entering block 0 for every window ``[n, seq, hidden]`` and the keyword
    arguments the model passes to its blocks (rotary embeddings, masks), captured by a hook that
    stops the forward right there (only the embeddings run)."""
    layers = decoder_layers(model)
    captured: list[torch.Tensor] = []
    kwargs_box: dict = {}

    def hook(_mod, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append(hidden.detach().to(store_device))
        if not kwargs_box:
            kwargs_box.update({k: v for k, v in kwargs.items() if k not in ("hidden_states",)})
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for i in range(windows.shape[0]):
                try:
                    model(input_ids=windows[i : i + 1].to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    block_kwargs = {}
    for k, v in kwargs_box.items():
        if k in ("past_key_value", "past_key_values", "cache_position"):
            continue
        block_kwargs[k] = v
    block_kwargs["use_cache"] = False
    return torch.cat(captured), block_kwargs


@torch.no_grad()
def run_block(
    block: nn.Module, inputs: torch.Tensor, kwargs: dict, batch_size: int, device: torch.device
) -> torch.Tensor:
    """The block applied to every input window, in batches; same device/dtype as ``inputs``."""
    outs = torch.empty_like(inputs)
    for start in range(0, inputs.shape[0], batch_size):
        x = inputs[start : start + batch_size].to(device)
        outs[start : start + batch_size] = _block_output(block(x, **kwargs)).to(outs.device, outs.dtype)
    return outs


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _broadcast_module(module: nn.Module) -> None:
    """Make every rank hold rank 0's result (GPU clustering is not bit-deterministic)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def _target_linears(block: nn.Module, pattern: str, prefix: str, keep: set[str]) -> dict[str, nn.Linear]:
    regex = re.compile(pattern)
    return {
        name: m
        for name, m in block.named_modules()
        if isinstance(m, nn.Linear) and regex.search(name) and f"{prefix}{name}" not in keep
    }


@torch.no_grad()
def salience_scores(
    model: nn.Module, windows: torch.Tensor, targets: str, device: torch.device, batch_size: int = 8
) -> dict[str, float]:
    """Score each target linear by the error it would incur, weighted by the Hessian diagonal:
    sum_j E[x_j²] · ||W[:, j] - RTN2(W)[:, j]||² with a per-row 2-bit round-to-nearest proxy.
    One forward pass of the float model; high score = most salient."""
    layers = decoder_layers(model)
    regex = re.compile(targets)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    for i, block in enumerate(layers):
        for name, m in block.named_modules():
            if isinstance(m, nn.Linear) and regex.search(name):
                full = f"model.layers.{i}.{name}"

                def hook(_m, args, full=full):
                    x = args[0].reshape(-1, args[0].shape[-1]).float()
                    sums[full] = sums.get(full, 0) + (x * x).sum(0)
                    counts[full] = counts.get(full, 0) + x.shape[0]

                handles.append(m.register_forward_pre_hook(hook))
    try:
        for start in range(0, windows.shape[0], batch_size):
            model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
    finally:
        remove_hooks(handles)
    scores = {}
    for full, s in sums.items():
        w = model.get_submodule(full).weight.float()
        lo, hi = w.min(1, keepdim=True).values, w.max(1, keepdim=True).values
        step = ((hi - lo) / 3).clamp_min(1e-12)
        w_hat = ((w - lo) / step).round().clamp(0, 3) * step + lo
        diag = (s / counts[full]).to(w.device)
        scores[full] = float((((w - w_hat) ** 2) * diag).sum())
    return scores


class BlockCheckpoints:
    """Finished blocks on disk: ``block_XXX.safetensors`` (the whole block's state: compressed
    modules, and the norm weights and biases that block fine-tuning changed) and ``progress.json``
    (specs, reports, and the config they were made with)."""

    def __init__(self, directory: str | Path | None, config: CompressionConfig) -> None:
        self.dir = Path(directory) if directory else None
        self.config = config.to_dict()
        self.progress: dict = {"config": self.config, "blocks": {}}
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            path = self.dir / "progress.json"
            if path.is_file():
                stored = json.loads(path.read_text())
                if stored.get("config") != self.config:
                    raise ValueError(
                        f"{path} was written with a different compression config; use another resume "
                        "directory or delete it to start over"
                    )
                self.progress = stored

    def finished(self, index: int) -> dict | None:
        return self.progress["blocks"].get(str(index))

    def save(self, index: int, block: nn.Module, specs: dict, entry: dict) -> None:
        if self.dir is None:
            return
        # The whole block, not only the compressed modules: block fine-tuning also trains norms.
        tensors = {k: v.detach().cpu().contiguous() for k, v in block.state_dict().items()}
        tmp = self.dir / f"block_{index:03d}.safetensors.tmp"
        save_file(tensors, str(tmp))
        tmp.replace(self.dir / f"block_{index:03d}.safetensors")
        self.progress["blocks"][str(index)] = {"specs": specs, **entry}
        tmp_json = self.dir / "progress.json.tmp"
        tmp_json.write_text(json.dumps(self.progress, indent=1))
        tmp_json.replace(self.dir / "progress.json")

    def restore(self, index: int, block: nn.Module, device: torch.device) -> dict:
        entry = self.finished(index)
        tensors = load_file(str(self.dir / f"block_{index:03d}.safetensors"))
        for name, spec in entry["specs"].items():
            _set_submodule(block, name, build_module(spec).to(device))
        block.load_state_dict(tensors, strict=True)
        return entry


def compress_model(
    model: nn.Module,
    windows: torch.Tensor,
    config: CompressionConfig,
    device: str | torch.device | None = None,
    resume_dir: str | Path | None = None,
    progress: bool = True,
) -> CompressionReport:
    """Compress the target linears of every block of ``model`` in place, in order.

    ``windows`` ``[n, seq]`` are this rank's calibration token windows. Under torch.distributed
    each rank passes its own shard; Hessians are all-reduced and rank 0's compressed tensors are
    broadcast, so all ranks end with the same model.
    """
    t0 = time.perf_counter()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    method_cfg = config.method_settings()
    finetune_cfg = config.finetune_settings()
    hdtype = HESSIAN_DTYPES[config.hessian_dtype]
    checkpoints = BlockCheckpoints(resume_dir, config)
    report = CompressionReport()
    layers = decoder_layers(model)
    model_device = next(model.parameters()).device

    keep: set[str] = set()
    if config.keep_dense:
        model.to(device)
        scores = salience_scores(model, windows, config.targets, device, config.forward_batch_size)
        keep = set(sorted(scores, key=scores.get, reverse=True)[: config.keep_dense])
        report.kept_dense = sorted(keep)
        model.to(model_device)

    # Embeddings (and rotary tables) on the working device to capture block-0 inputs.
    store = torch.device("cpu") if config.offload_activations else device
    base = getattr(model, "model", model)
    moved = [m for n, m in base.named_children() if n != "layers"]
    for m in moved:
        m.to(device)
    inputs, block_kwargs = capture_block_inputs(model, windows, device, store)
    for m in moved:
        m.to(model_device)

    bar = tqdm(total=len(layers), desc=f"compress ({config.method})", disable=not progress)
    for i, block in enumerate(layers):
        prefix = f"model.layers.{i}."
        block.to(device)
        done = checkpoints.finished(i)
        if done is not None:
            entry = checkpoints.restore(i, block, device)
            report.layers.extend(LayerReport(**{**r, "shape": tuple(r["shape"])}) for r in entry["layers"])
            if entry.get("block_finetune"):
                report.block_finetune.append(entry["block_finetune"])
            inputs = run_block(block, inputs, block_kwargs, config.forward_batch_size, device)
            block.to(model_device)
            bar.update(1)
            bar.set_postfix_str(f"block {i} restored from {resume_dir}")
            continue

        targets_float = (
            run_block(block, inputs, block_kwargs, config.forward_batch_size, device) if finetune_cfg else None
        )
        remaining = _target_linears(block, config.targets, prefix, keep)
        specs: dict[str, dict] = {}
        block_layers: list[LayerReport] = []
        while remaining:
            accs, handles = attach_hessian_hooks(remaining, hdtype, device)
            try:
                run_block(block, inputs, block_kwargs, config.forward_batch_size, device)
            finally:
                remove_hooks(handles)
            never_called = sorted(set(remaining) - set(accs))
            if never_called:
                raise RuntimeError(f"block {i}: linears {never_called} were never called during calibration")
            for acc in {id(a): a for a in accs.values()}.values():
                acc.all_reduce()
            first = next(iter(accs))
            group = [n for n in accs if accs[n] is accs[first]] if config.true_sequential else list(accs)
            for name in group:
                t_layer = time.perf_counter()
                layer = remaining.pop(name)
                hessian = accs[name].hessian
                new = registry.quantize_linear(layer, hessian, method_cfg)
                new = new.to(device)
                _broadcast_module(new)
                w_hat = new.dequantize() if hasattr(new, "dequantize") else new.weight
                rep = LayerReport(
                    name=prefix + name,
                    shape=(layer.out_features, layer.in_features),
                    relative_error=relative_layer_error(layer.weight.float(), w_hat.float(), hessian),
                    bits_per_weight=float(new.bits_per_weight()) if hasattr(new, "bits_per_weight") else float("nan"),
                    seconds=time.perf_counter() - t_layer,
                )
                block_layers.append(rep)
                specs[name] = module_spec(new)
                _set_submodule(block, name, new)
                bar.set_postfix_str(f"block {i} {name} rel.err {rep.relative_error:.4f}")
        ft_stats = None
        if finetune_cfg is not None and specs:
            from lit_cb.block_finetune import finetune_block

            ft_stats = finetune_block(block, inputs, targets_float, block_kwargs, finetune_cfg)
            ft_stats = {"block": i, **ft_stats}
            for name in specs:
                _broadcast_module(block.get_submodule(name))
            report.block_finetune.append(ft_stats)
        del targets_float
        report.layers.extend(block_layers)
        checkpoints.save(i, block, specs, {"layers": [asdict(r) for r in block_layers], "block_finetune": ft_stats})
        inputs = run_block(block, inputs, block_kwargs, config.forward_batch_size, device)
        block.to(model_device)
        bar.update(1)
    bar.close()
    report.seconds = time.perf_counter() - t0
    return report


def bits_per_weight(model: nn.Module) -> dict[str, float]:
    """Bits per weight over the compressed linears, and over the whole model (every other
    parameter counted at 16 bits, tied weights once)."""
    compressed_bits = 0.0
    compressed_params = 0
    compressed_names: set[str] = set()
    for name, m in model.named_modules():
        if hasattr(m, "bits_per_weight") and not isinstance(m, nn.Linear):
            n = m.in_features * m.out_features
            compressed_bits += float(m.bits_per_weight()) * n
            compressed_params += n
            compressed_names.add(name)
    other = 0
    seen: set[int] = set()
    for name, p in model.named_parameters():
        owner = name.rsplit(".", 1)[0]
        if owner in compressed_names or id(p) in seen:
            continue
        seen.add(id(p))
        other += p.numel()
    total_params = compressed_params + other
    return {
        "compressed_linears": compressed_bits / compressed_params if compressed_params else 16.0,
        "whole_model": (compressed_bits + 16.0 * other) / total_params,
        "compressed_params": compressed_params,
        "total_params": total_params,
    }
