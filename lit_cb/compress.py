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

import contextlib
import json
import re
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from lit_cb import distributed as D
from lit_cb.architectures import DEFAULT_TARGETS, check_attention_uniform, spec_for  # noqa: F401 (DEFAULT_TARGETS re-exported)
from lit_cb.configs.compression import CompressionConfig  # noqa: F401 (re-exported: the config lives torch-free)
from lit_cb.fingerprint import check_same, flatten
from lit_cb.hessian import HESSIAN_DTYPES, attach_hessian_hooks, remove_hooks
from lit_cb.integrity import check_blocks_readable
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
    # Index into compression.bit_options of the option this layer took (None: no bit_budget).
    option: int | None = None


@dataclass
class CompressionReport:
    layers: list[LayerReport] = field(default_factory=list)
    kept_dense: list[str] = field(default_factory=list)
    block_finetune: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    # Per stage (capture, forward, hessian, quantize, block_finetune, save): seconds summed over
    # blocks and peak GPU memory (max over blocks; None on CPU).
    stages: dict[str, dict] = field(default_factory=dict)
    peak_gpu_gb: float | None = None
    block_seconds: list[float] = field(default_factory=list)
    world_size: int = 1
    # Mixed precision (compression.bit_budget): the allocation's summary and each layer's option.
    bit_allocation: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class _StopForward(Exception):
    pass


def _block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _pinned(device: torch.device, store: torch.device) -> bool:
    """Offloaded activations live in page-locked memory when a GPU reads them: host<->device
    copies from pinned memory run asynchronously (``non_blocking``) and at full PCIe speed."""
    return store.type == "cpu" and device.type == "cuda"


def capture_block_inputs(
    model: nn.Module, windows: torch.Tensor, device: torch.device, store_device: torch.device
) -> tuple[torch.Tensor, dict]:
    """Hidden states entering block 0 for every window ``[n, seq, hidden]`` and the keyword
    arguments the model passes to its blocks (rotary embeddings, masks), captured by a hook that
    stops the forward right there (only the embeddings run). With ``store_device`` the CPU and
    ``device`` a GPU, the states go to one pinned buffer, copied asynchronously."""
    layers = decoder_layers(model)
    box: dict = {}
    kwargs_box: dict = {}

    def hook(_mod, args, kwargs):
        box["hidden"] = (args[0] if args else kwargs.pop("hidden_states")).detach()
        if not kwargs_box:
            kwargs_box.update({k: v for k, v in kwargs.items() if k not in ("hidden_states",)})
        raise _StopForward

    pin = _pinned(device, store_device)
    captured: torch.Tensor | None = None
    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for i in range(windows.shape[0]):
                try:
                    model(input_ids=windows[i : i + 1].to(device), use_cache=False)
                except _StopForward:
                    pass
                hidden = box.pop("hidden")
                if captured is None:
                    shape = (windows.shape[0], *hidden.shape[1:])
                    captured = torch.empty(shape, dtype=hidden.dtype, device=store_device, pin_memory=pin)
                captured[i : i + 1].copy_(hidden, non_blocking=pin)
    finally:
        handle.remove()
    if pin:
        torch.cuda.synchronize(device)  # the last asynchronous device->host copies
    block_kwargs = {}
    for k, v in kwargs_box.items():
        if k in ("past_key_value", "past_key_values", "cache_position"):
            continue
        block_kwargs[k] = v
    block_kwargs["use_cache"] = False
    return captured, block_kwargs


@torch.no_grad()
def run_block(
    block: nn.Module,
    inputs: torch.Tensor,
    kwargs: dict,
    batch_size: int,
    device: torch.device,
    collect: bool = True,
) -> torch.Tensor | None:
    """The block applied to every input window, in batches; same device/dtype as ``inputs``
    (``collect=False``: run for the hooks only, return None). Pinned CPU inputs are streamed to
    the device and the outputs back into a pinned buffer without blocking, so copies overlap the
    next batch's compute; the device is synchronised once at the end."""
    pin = inputs.device.type == "cpu" and device.type == "cuda" and inputs.is_pinned()
    outs = None
    if collect:
        outs = torch.empty(inputs.shape, dtype=inputs.dtype, device=inputs.device, pin_memory=pin)
    for start in range(0, inputs.shape[0], batch_size):
        x = inputs[start : start + batch_size].to(device, non_blocking=pin)
        y = _block_output(block(x, **kwargs))
        if outs is not None:
            outs[start : start + batch_size].copy_(y, non_blocking=pin)
    if pin:
        torch.cuda.synchronize(device)
    return outs


class _Stages:
    """Wall time (summed) and peak GPU memory (max) of each stage of :func:`compress_model`.

    The CUDA peak counter is reset at every stage start, so the overall peak is the max over the
    stages (``overall_peak_gpu_gb``), not ``torch.cuda.max_memory_allocated`` afterwards."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stats: dict[str, dict[str, float | None]] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            peak = None
            if cuda:
                torch.cuda.synchronize(self.device)
                peak = torch.cuda.max_memory_allocated(self.device) / 2**30
            entry = self.stats.setdefault(name, {"seconds": 0.0, "peak_gpu_gb": None})
            entry["seconds"] += time.perf_counter() - t0
            if peak is not None:
                entry["peak_gpu_gb"] = max(entry["peak_gpu_gb"] or 0.0, peak)

    def overall_peak_gpu_gb(self) -> float | None:
        peaks = [e["peak_gpu_gb"] for e in self.stats.values() if e["peak_gpu_gb"] is not None]
        return max(peaks) if peaks else None


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


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
    One forward pass of the float model; high score = most salient.

    Under torch.distributed ``windows`` is this rank's shard: the sums of x² (float64) and the
    token counts are all-reduced before scoring, so every rank scores the same global E[x_j²]
    and keeps the same layers dense (ranks that kept different layers would hang later)."""
    spec = spec_for(model)
    layers = spec.decoder_layers(model)
    regex = re.compile(spec.compression_targets(targets))
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    for i, block in enumerate(layers):
        for name, m in block.named_modules():
            if isinstance(m, nn.Linear) and regex.search(name):
                full = f"{spec.block_prefix(i)}{name}"

                def hook(_m, args, full=full):
                    x = args[0].reshape(-1, args[0].shape[-1]).double()
                    sums[full] = sums.get(full, 0) + (x * x).sum(0)
                    counts[full] = counts.get(full, 0) + x.shape[0]

                handles.append(m.register_forward_pre_hook(hook))
    try:
        for start in range(0, windows.shape[0], batch_size):
            model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
    finally:
        remove_hooks(handles)
    names = sorted(sums)
    if D.is_distributed():
        counts_t = torch.tensor([float(counts[n]) for n in names], dtype=torch.float64, device=sums[names[0]].device)
        D.all_reduce_sum_([sums[n] for n in names] + [counts_t])
        counts = {n: int(c) for n, c in zip(names, counts_t.tolist(), strict=True)}
    scores = {}
    for full in names:
        s = sums[full]
        w = model.get_submodule(full).weight.float()
        lo, hi = w.min(1, keepdim=True).values, w.max(1, keepdim=True).values
        step = ((hi - lo) / 3).clamp_min(1e-12)
        w_hat = ((w - lo) / step).round().clamp(0, 3) * step + lo
        diag = (s / counts[full]).float().to(w.device)
        scores[full] = float((((w - w_hat) ** 2) * diag).sum())
    return scores


class BlockCheckpoints:
    """Finished blocks on disk: ``block_XXX.safetensors`` (the whole block's state: compressed
    modules, and the norm weights and biases that block fine-tuning changed) and ``progress.json``
    (specs, reports, and the config they were made with)."""

    def __init__(
        self, directory: str | Path | None, config: CompressionConfig, fingerprint: dict | None = None
    ) -> None:
        self.dir = Path(directory) if directory else None
        self.config = config.made_with()
        # What the blocks were made from (model, calibration data, lit_cb version; see
        # lit_cb.fingerprint.compression_scope): blocks of another model of the same shape must
        # not be restored.
        self.progress: dict = {"config": self.config, "fingerprint": fingerprint, "blocks": {}}
        if self.dir is not None:
            path = self.dir / "progress.json"
            if path.is_file():
                try:
                    stored = json.loads(path.read_text())
                except ValueError as err:
                    raise ValueError(
                        f"{path} is corrupt ({err}); move the folder {self.dir} away to compress from scratch"
                    ) from err
                check_blocks_readable(self.dir, stored.get("blocks", {}))
                check_same(
                    stored.get("fingerprint"),
                    fingerprint,
                    f"the finished blocks in {self.dir}",
                    "Use another resume directory (run_name/output_dir), or overwrite=true to move the old run aside.",
                )
                if stored.get("config") != self.config:
                    changed = sorted(
                        k
                        for k in set(flatten(stored.get("config"))) | set(flatten(self.config))
                        if flatten(stored.get("config")).get(k) != flatten(self.config).get(k)
                    )
                    raise ValueError(
                        f"{path} was written with a different compression config (changed: {changed}); use "
                        "another resume directory or delete it to start over"
                    )
                self.progress = stored
            self.dir.mkdir(parents=True, exist_ok=True)

    def finished(self, index: int) -> dict | None:
        return self.progress["blocks"].get(str(index))

    def save(self, index: int, block: nn.Module, specs: dict, entry: dict) -> None:
        """Write a finished block. Under torch.distributed only global rank 0 writes (every rank
        holds the same block, and ranks writing the same ``.tmp`` names on a shared filesystem
        would race); the others wait at a barrier, so when ``save`` returns the files are
        complete for every rank (a resume reads them on all ranks: the directory must be on a
        filesystem they share, as on a SLURM cluster)."""
        if self.dir is None:
            return
        self.progress["blocks"][str(index)] = {"specs": specs, **entry}
        if D.rank() == 0:
            # The whole block, not only the compressed modules: block fine-tuning also trains norms.
            tensors = {k: v.detach().cpu().contiguous() for k, v in block.state_dict().items()}
            tmp = self.dir / f"block_{index:03d}.safetensors.tmp"
            save_file(tensors, str(tmp))
            tmp.replace(self.dir / f"block_{index:03d}.safetensors")
            tmp_json = self.dir / "progress.json.tmp"
            tmp_json.write_text(json.dumps(self.progress, indent=1))
            tmp_json.replace(self.dir / "progress.json")
        D.barrier()

    def restore(self, index: int, block: nn.Module, device: torch.device) -> dict:
        entry = self.finished(index)
        tensors = load_file(str(self.dir / f"block_{index:03d}.safetensors"))
        for name, spec in entry["specs"].items():
            _set_submodule(block, name, build_module(spec).to(device))
        block.load_state_dict(tensors, strict=True)
        return entry


def _quantize_owned(
    group: list[str],
    remaining: dict[str, nn.Linear],
    accs: dict,
    method_cfg: Any,
    prefix: str,
    device: torch.device,
    layer_cfgs: dict[str, tuple[int, Any]] | None = None,
    row_weights: dict[str, torch.Tensor] | None = None,
) -> dict[str, tuple[nn.Module | None, dict, dict]]:
    """Compress this rank's share of ``group`` and hand every rank every result.

    Whole linears are assigned to ranks by cost (out x in, greedy, :func:`assign_owners`); each
    rank quantizes its own under a random state seeded from the layer's name (so a layer's result
    does not depend on which rank made it), then each result is broadcast from its owner: first
    its spec and report (objects), then its tensors into a module the receivers build from the
    spec. ``layer_cfgs`` (full name -> (index into ``bit_options``, method config)) replaces
    ``method_cfg`` per layer under ``compression.bit_budget``; ``row_weights`` (full name -> ``[out]``)
    weigh each layer's output rows under ``compression.row_weighting``. Returns ``name -> (module, spec,
    report fields)`` in ``group`` order."""
    world, me = D.world_size(), D.rank()
    owners = D.assign_owners({n: remaining[n].out_features * remaining[n].in_features for n in group}, world)
    run_seed = int(getattr(method_cfg, "seed", 0))
    made: dict[str, tuple[nn.Module, dict, dict]] = {}
    for name in group:
        if owners[name] != me:
            continue
        t_layer = time.perf_counter()
        layer = remaining[name]
        hessian = accs[name].hessian
        fork_devices = []
        if device.type == "cuda":
            fork_devices = [device.index if device.index is not None else torch.cuda.current_device()]
        option, cfg = (layer_cfgs or {}).get(prefix + name, (None, method_cfg))
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(D.layer_seed(prefix + name, run_seed))
            if row_weights is None:
                new = registry.quantize_linear(layer, hessian, cfg)
            else:
                new = registry.quantize_linear(layer, hessian, cfg, row_weights[prefix + name].to(device))
        new = new.to(device)
        w_hat = new.dequantize() if hasattr(new, "dequantize") else new.weight
        rep = {
            "relative_error": relative_layer_error(layer.weight.float(), w_hat.float(), hessian),
            "bits_per_weight": float(new.bits_per_weight()) if hasattr(new, "bits_per_weight") else float("nan"),
            "seconds": time.perf_counter() - t_layer,
            "option": option,
        }
        made[name] = (new, module_spec(new), rep)
    results: dict[str, tuple[nn.Module | None, dict, dict]] = {}
    for name in group:
        src = owners[name]
        mine = made.get(name)
        spec, rep = D.broadcast_object((mine[1], mine[2]) if mine else None, src=src)
        module = mine[0] if mine else build_module(spec).to(device)
        D.broadcast_module(module, src=src)
        results[name] = (module, spec, rep)
    return results


def _all_targets(model: nn.Module, pattern: str) -> dict[str, nn.Linear]:
    """Every target linear of the model by full name (``pattern`` already resolved for the family)."""
    arch = spec_for(model)
    return {
        f"{arch.block_prefix(i)}{name}": m
        for i, block in enumerate(arch.decoder_layers(model))
        for name, m in _target_linears(block, pattern, arch.block_prefix(i), set()).items()
    }


def compress_model(
    model: nn.Module,
    windows: torch.Tensor,
    config: CompressionConfig,
    device: str | torch.device | None = None,
    resume_dir: str | Path | None = None,
    progress: bool = True,
    fingerprint: dict | None = None,
) -> CompressionReport:
    """Compress the target linears of every block of ``model`` in place, in order.

    ``windows`` ``[n, seq]`` are this rank's calibration token windows. Under torch.distributed
    (gloo or NCCL; every rank calls this with its own shard, e.g. ``windows[rank::world_size]``
    as :meth:`CompressionDataModule.calibration_windows` gives) the work is split:

    * calibration forwards and Hessian accumulation run on each rank's windows; the Hessian sums
      and token counts are all-reduced (:meth:`HessianAccumulator.all_reduce`);
    * the linears of each group (q/k/v, o, gate/up, down) are divided across ranks by cost, each
      rank compresses its own and broadcasts them (:func:`_quantize_owned`);
    * block fine-tuning is data-parallel (gradients all-reduced before each step, see
      :func:`lit_cb.block_finetune.finetune_block`), then the whole block state is broadcast
      from rank 0 as a safety net;
    * keep_dense salience statistics are all-reduced; only rank 0 writes ``resume_dir``.

    All ranks end with bit-identical models. N processes versus one: codes and every tensor are
    computed by the same code from the same inputs except for floating-point summation order:
    the Hessian is a sum over windows, and N ranks sum their shards separately (in batches of
    other windows) before the all-reduce adds the partial sums. In float64 (``hessian_dtype:
    float64``) that changes H by ~1e-16 relative, and H reaches the methods rounded to float32,
    so H, codes, codebooks and scales come out identical unless an entry sits within ~1e-16 of a
    float32 rounding boundary (about one entry in 10^8; a 7B block has ~1.7e8 Hessian entries).
    In float32 H differs by ~1e-7 relative and codes can flip where two centroids nearly tie.
    On GPUs the calibration forwards themselves may differ in the last bit, because cuBLAS picks
    kernels by batch shape and the batches hold other windows. Block fine-tuning sums the
    gradients of each mini-batch per rank and then across ranks (float32, ~1e-7 relative per step).
    Measured on the tiny test model (CPU, 2 gloo ranks, ``tests/test_distributed.py``): with
    float64 Hessians every tensor of the codebook and AQLM results is bit-identical to one
    process; with float32 Hessians the codebook codes stay identical but codebooks/scales differ
    by up to 1.5e-5, and AQLM flips 7 of 36,864 codes (fp16 values differ by up to 4e-3).

    ``fingerprint`` (what the blocks are made from) is stored with the finished blocks; resuming
    blocks of another fingerprint refuses.

    With ``config.bit_budget`` each layer is compressed with one of ``config.bit_options``, chosen
    once before the first block from the float model's measured sensitivities
    (:mod:`lit_cb.sensitivity`, stage ``sensitivity``) and stored as
    ``resume_dir/bit_allocation.json``, which a resume reuses unchanged.
    """
    t0 = time.perf_counter()
    # The family's layout first: an unsupported model is refused before anything is written.
    arch = spec_for(model)
    layers = arch.decoder_layers(model)
    targets = arch.compression_targets(config.targets)
    check_attention_uniform(model.config, windows.shape[-1])
    if config.bit_budget is not None:
        from lit_cb import sensitivity

        # Options that do not fit a layer, or a budget below the cheapest allocation: before any work.
        sensitivity.check_bit_budget(_all_targets(model, targets), config)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    method_cfg = config.method_settings()
    finetune_cfg = config.finetune_settings()
    hdtype = HESSIAN_DTYPES[config.hessian_dtype]
    checkpoints = BlockCheckpoints(resume_dir, config, fingerprint)
    report = CompressionReport(world_size=D.world_size())
    if D.is_distributed() and hdtype != torch.float64 and D.rank() == 0:
        warnings.warn(
            f"compression.hessian_dtype={config.hessian_dtype!r} with {D.world_size()} ranks: the per-rank "
            "Hessian sums round differently than one process's sum would; use float64 for results that "
            "match a single-process run",
            stacklevel=2,
        )
    stage = _Stages(device)
    model_device = next(model.parameters()).device
    # Every rank must see the same finished blocks, or they would take different branches below.
    D.check_same_on_all_ranks(
        sorted(k for k in range(len(layers)) if checkpoints.finished(k) is not None),
        f"the finished blocks in {resume_dir} (resume_dir must be on a filesystem all ranks share)",
    )

    keep: set[str] = set()
    if config.keep_dense:
        model.to(device)
        scores = salience_scores(model, windows, targets, device, config.forward_batch_size)
        keep = set(sorted(scores, key=lambda n: (-scores[n], n))[: config.keep_dense])
        D.check_same_on_all_ranks(sorted(keep), "the layers kept dense")
        report.kept_dense = sorted(keep)
        model.to(model_device)

    layer_cfgs: dict[str, tuple[int, Any]] | None = None
    if config.bit_budget is not None:
        # Fixed once from the float model, before the first block is compressed (see lit_cb.sensitivity).
        with stage("sensitivity"):
            record = sensitivity.plan_bit_allocation(
                model, windows, config, keep, device, resume_dir, fingerprint, progress=False
            )
        options = config.bit_option_settings()
        layer_cfgs = {name: (j, options[j]) for name, j in record["choice"].items()}
        report.bit_allocation = {k: record[k] for k in ("budget", "bit_options", "choice", "allocation", "reused")}
        if progress and D.rank() == 0:
            tqdm.write(sensitivity.allocation_summary(record))

    row_weights: dict[str, torch.Tensor] | None = None
    if config.row_weighting == "fisher":
        from lit_cb import sensitivity

        # From the float model, before the first block (as the bit allocation), kept for resumes.
        with stage("fisher"):
            every = {n: m for n, m in _all_targets(model, targets).items() if n not in keep}
            row_weights = sensitivity.plan_row_weights(model, windows, every, device, resume_dir)

    # A restored block's calibration outputs are only needed as the inputs of a block still to compress: after the
    # last unfinished block (or in a run whose blocks are all finished, as a recovery from compression.blocks_from
    # starts) restoring is a load, with no forward (on a CPU a SmolLM2 block's forward of 128 x 2048 tokens takes
    # about 80 s).
    last_todo = max((k for k in range(len(layers)) if checkpoints.finished(k) is None), default=-1)
    inputs, block_kwargs = None, {}
    if last_todo >= 0:
        # Embeddings (and rotary tables) on the working device to capture block-0 inputs.
        store = torch.device("cpu") if config.offload_activations else device
        moved = arch.present_input_modules(model)
        with stage("capture"):
            for m in moved:
                m.to(device)
            inputs, block_kwargs = capture_block_inputs(model, windows, device, store)
            for m in moved:
                m.to(model_device)

    def forward(block: nn.Module, collect: bool = True) -> torch.Tensor | None:
        return run_block(block, inputs, block_kwargs, config.forward_batch_size, device, collect)

    bar = tqdm(total=len(layers), desc=f"compress ({config.method})", disable=not progress)
    for i, block in enumerate(layers):
        t_block = time.perf_counter()
        prefix = arch.block_prefix(i)
        block.to(device)
        done = checkpoints.finished(i)
        if done is not None:
            entry = checkpoints.restore(i, block, device)
            report.layers.extend(LayerReport(**{**r, "shape": tuple(r["shape"])}) for r in entry["layers"])
            if entry.get("block_finetune"):
                report.block_finetune.append(entry["block_finetune"])
            if i < last_todo:
                with stage("forward"):
                    inputs = forward(block)
            block.to(model_device)
            bar.update(1)
            bar.set_postfix_str(f"block {i} restored from {resume_dir}")
            continue

        with stage("forward"):
            targets_float = forward(block) if finetune_cfg else None
        remaining = _target_linears(block, targets, prefix, keep)
        specs: dict[str, dict] = {}
        block_layers: list[LayerReport] = []
        while remaining:
            with stage("hessian"):
                accs, handles = attach_hessian_hooks(remaining, hdtype, device)
                try:
                    forward(block, collect=False)
                finally:
                    remove_hooks(handles)
                never_called = sorted(set(remaining) - set(accs))
                if never_called:
                    raise RuntimeError(f"block {i}: linears {never_called} were never called during calibration")
                for acc in {id(a): a for a in accs.values()}.values():
                    acc.all_reduce()
            first = next(iter(accs))
            group = [n for n in accs if accs[n] is accs[first]] if config.true_sequential else list(accs)
            with stage("quantize"):
                results = _quantize_owned(group, remaining, accs, method_cfg, prefix, device, layer_cfgs, row_weights)
            del accs
            for name, (new, spec, rep) in results.items():
                layer = remaining.pop(name)
                block_layers.append(
                    LayerReport(name=prefix + name, shape=(layer.out_features, layer.in_features), **rep)
                )
                specs[name] = spec
                _set_submodule(block, name, new)
                bar.set_postfix_str(f"block {i} {name} rel.err {rep['relative_error']:.4f}")
        ft_stats = None
        if finetune_cfg is not None and specs:
            from lit_cb.block_finetune import finetune_block

            with stage("block_finetune"):
                ft_stats = finetune_block(block, inputs, targets_float, block_kwargs, finetune_cfg)
                # Data-parallel steps keep ranks equal already; make the whole block (norms
                # included) bit-identical regardless, from rank 0.
                D.broadcast_module(block, src=0)
            ft_stats = {"block": i, **ft_stats}
            report.block_finetune.append(ft_stats)
        del targets_float
        report.layers.extend(block_layers)
        with stage("save"):
            checkpoints.save(i, block, specs, {"layers": [asdict(r) for r in block_layers], "block_finetune": ft_stats})
        if i < len(layers) - 1:  # the last block's outputs feed nothing
            with stage("forward"):
                inputs = forward(block)
        block.to(model_device)
        report.block_seconds.append(time.perf_counter() - t_block)
        bar.update(1)
    bar.close()
    report.stages = stage.stats
    report.peak_gpu_gb = stage.overall_peak_gpu_gb()
    report.seconds = time.perf_counter() - t0
    return report


def bits_per_weight(model: nn.Module) -> dict[str, float]:
    """Nominal bits per weight over the compressed linears (each layer's ``bits_per_weight``: codes at
    their B bits, fp16 codebooks, scales and zeros, the low-rank slot), and over the whole model (every
    other parameter counted at 16 bits, tied weights once). What a saved folder really holds is
    measured by :func:`lit_cb.serialization.bits_per_weight_on_disk`; with the codes bit-packed the
    two agree up to the padding of each code stream to a whole byte."""
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
