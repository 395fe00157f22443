"""Mixed precision by sensitivity: measure every option's error on every layer, allocate bits once.

``compression.bit_budget`` (average bits/weight over the compressed linears) with
``compression.bit_options`` (method_config overrides) lets each layer take the option that
minimises the model's summed error at that budget (:mod:`lit_cb.quant.allocation`).

When: compression is block-by-block and true-sequential, so the Hessians the real compression
uses depend on the blocks compressed before. The allocation must be fixed before the first block
is compressed, so it is made from the **float model**: one calibration forward through all blocks
(block by block, as compression does; memory stays that of one block), collecting every target
linear's H = XᵀX at once and discarding it after scoring. The allocation is then written to
``<resume_dir>/bit_allocation.json`` and reused as it is on resume (never measured again).

What: for each layer ``l`` and option ``j`` the relative Hessian-weighted output error

    e_lj = tr((W - Ŵ_j) H (W - Ŵ_j)ᵀ) / tr(W H Wᵀ)

of the method's own quantizer, run cheaply (:func:`quick_settings`: fewer k-means / Adam
iterations, a smaller beam) on a seeded subsample of at most ``compression.sensitivity_max_rows``
rows (whole output groups; the error is a sum over rows, so the subsample's relative error
estimates the layer's; the subsample keeps >= 32 vectors per centroid so large codebooks do not
overfit it). The allocation minimises ``sum_l e_lj``: every layer's *relative* output error counts
alike, so a bit goes where it removes the most relative error. That treats a small, sensitive
k/v projection and a wide MLP projection on equal terms per layer, which is what makes mixed
precision pay off (uniform bits give the small layers the same bits/weight although each of
their bits buys more). Not modelled: how much a layer's output error matters to the final loss
(a Fisher weight would need a backward pass through the whole model).

Bits are exact: each option's cost is ``sum(fmt.storage_bits().values())`` of the format it produces
for that layer (a :class:`~lit_cb.layers.CodebookFormat`, or a :class:`~lit_cb.trellis.TrellisFormat`,
whose options are its bits per step), what :func:`lit_cb.compress.bits_per_weight` counts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lit_cb import distributed as D
from lit_cb.architectures import spec_for
from lit_cb.configs.aqlm import AQLMConfig
from lit_cb.configs.codebook import CodebookConfig
from lit_cb.configs.compression import CompressionConfig
from lit_cb.configs.trellis import TrellisConfig
from lit_cb.fingerprint import check_same
from lit_cb.hessian import HESSIAN_DTYPES, attach_hessian_hooks, remove_hooks
from lit_cb.layers import CodebookFormat
from lit_cb.quant import registry
from lit_cb.quant.allocation import Allocation, LayerChoices, allocate, budget_bits
from lit_cb.quant.objective import fisher_layer_error, relative_layer_error
from lit_cb.trellis import TrellisFormat

ALLOCATION_FILE = "bit_allocation.json"
MIN_VECTORS_PER_CENTROID = 32  # the row subsample keeps at least this many group vectors per centroid


def layer_format(method_cfg: Any, layer: nn.Linear) -> CodebookFormat | TrellisFormat:
    """The format ``method_cfg`` gives ``layer`` (what its ``storage_bits`` count)."""
    bias = layer.bias is not None
    if isinstance(method_cfg, CodebookConfig):
        return method_cfg.make_format(layer.in_features, layer.out_features, bias)
    if isinstance(method_cfg, AQLMConfig | TrellisConfig):
        return method_cfg.layer_format(layer.out_features, layer.in_features, bias)
    raise TypeError(f"{type(method_cfg).__name__} has no per-layer format; bit_budget needs codebook, aqlm or trellis")


def option_costs(layer: nn.Linear, settings: list) -> tuple[int, ...]:
    """Exact storage bits of ``layer`` under each option (codes + codebooks + scales)."""
    return tuple(int(sum(layer_format(s, layer).storage_bits().values())) for s in settings)


def check_bit_budget(targets: dict[str, nn.Linear], config: CompressionConfig) -> None:
    """Before any work: every option's format fits every target layer, and the budget is reachable
    (the cheapest option of every layer fits). Warns when every option of every layer fits (the
    budget then constrains nothing: each layer simply takes its lowest-error option)."""
    settings = config.bit_option_settings()
    if not settings:
        return
    for name, layer in targets.items():
        for i, s in enumerate(settings):
            try:
                layer_format(s, layer)
            except ValueError as err:
                raise ValueError(
                    f"compression.bit_options[{i}]={config.bit_options[i]!r} does not fit layer {name} "
                    f"(weight {layer.out_features}x{layer.in_features}): {err}"
                ) from err
    costs = {name: option_costs(layer, settings) for name, layer in targets.items()}
    total = sum(layer.in_features * layer.out_features for layer in targets.values())
    cap = budget_bits(config.bit_budget, total)
    cheapest = sum(min(c) for c in costs.values())
    dearest = sum(max(c) for c in costs.values())
    if cheapest > cap:
        raise ValueError(
            f"compression.bit_budget={config.bit_budget} is unreachable: the cheapest of compression.bit_options "
            f"on every layer already needs {cheapest / total:.4f} bits/weight ({len(targets)} linears, {total} "
            f"weights; the dearest allocation needs {dearest / total:.4f}); raise the budget or add cheaper options"
        )
    if dearest <= cap and D.rank() == 0:
        warnings.warn(
            f"compression.bit_budget={config.bit_budget}: every option fits on every layer (the dearest allocation "
            f"needs {dearest / total:.4f} bits/weight); each layer takes its lowest-error option",
            stacklevel=2,
        )


def quick_settings(method_cfg: Any) -> Any:
    """The cheap version of a method config the sensitivity pass runs. What matters is the
    options' errors relative to each other. Measured on SmolLM2-135M block 0 q/k/v/o/gate (g4 with
    nbits 7, 8, 9, 10; 8 x 512 C4 tokens; CPU): these settings on <= 512 rows gave relative errors
    within 5% of the full quantizer's (default settings, all rows; o_proj's errors, ~1e-4, agreed
    to 1e-4), in the same order, in 31-70% of its time. AQLM's reductions were not measured."""
    if isinstance(method_cfg, CodebookConfig):
        return dataclasses.replace(
            method_cfg,
            kmeans_iters=min(method_cfg.kmeans_iters, 10),
            codebook_update_steps=min(method_cfg.codebook_update_steps, 5),
        )
    if isinstance(method_cfg, AQLMConfig):
        return dataclasses.replace(
            method_cfg,
            max_epochs=min(method_cfg.max_epochs, 2),
            beam_size=min(method_cfg.beam_size, 4),
            codebook_steps=min(method_cfg.codebook_steps, 50),
        )
    return method_cfg


def _row_group(settings: Any) -> int:
    """Rows that the format quantizes together (a sample takes whole groups): a codebook's output group, a
    trellis's tile rows."""
    if isinstance(settings, TrellisConfig):
        return settings.tile_rows
    return getattr(settings, "out_group_size", 1)


def _weights_to_fit(settings: Any) -> int:
    """Weights a sample needs so that the option is not fitted to too few: >= 32 group vectors per centroid for
    the codebook formats; none for the trellis, whose values are computed, not fitted."""
    if isinstance(settings, TrellisConfig):
        return 0
    return MIN_VECTORS_PER_CENTROID * settings.codebook_size * settings.in_group_size * _row_group(settings)


def _sample_rows(layer: nn.Linear, settings: list, max_rows: int | None, seed: int) -> torch.Tensor | None:
    """Row indices (whole output groups) the options are measured on; None = every row."""
    out_f = layer.out_features
    if max_rows is None or max_rows >= out_f:
        return None
    og = math.lcm(*(_row_group(s) for s in settings))
    need = max(_weights_to_fit(s) for s in settings)
    rows = max(max_rows, math.ceil(need / layer.in_features))
    rows = -(-rows // og) * og
    if rows >= out_f or out_f % og:
        return None
    gen = torch.Generator().manual_seed(seed)
    groups = torch.randperm(out_f // og, generator=gen)[: rows // og].sort().values
    return (groups[:, None] * og + torch.arange(og)[None, :]).reshape(-1)


def measure_option_errors(
    layer: nn.Linear,
    hessian: torch.Tensor,
    settings: list,
    max_rows: int | None,
    seed: int,
    device: torch.device,
    fisher: torch.Tensor | None = None,
) -> list[float]:
    """Error of ``layer`` under each option (quick settings, row subsample): the relative Hessian-weighted
    error, or with ``fisher`` (the layer's per-output Fisher, ``[out]``) the Fisher-weighted one
    (:func:`~lit_cb.quant.objective.fisher_layer_error`), scaled from the sampled rows to the whole layer."""
    rows = _sample_rows(layer, settings, max_rows, seed)
    weight = layer.weight.detach().float()
    scale = 1.0
    if rows is not None:
        weight = weight[rows.to(weight.device)]
        if fisher is not None:
            fisher = fisher[rows.to(fisher.device)]
            scale = layer.out_features / len(rows)  # the sampled rows' sum estimates the layer's
    probe = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device)
    probe.weight.data.copy_(weight)
    errors = []
    fork = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    for j, s in enumerate(settings):
        with torch.random.fork_rng(devices=fork):
            torch.manual_seed(seed + j)
            new = registry.quantize_linear(probe, hessian, quick_settings(s)).to(weight.device)
        w_hat = new.dequantize().float()
        if fisher is None:
            errors.append(relative_layer_error(weight, w_hat, hessian))
        else:
            errors.append(scale * fisher_layer_error(weight, w_hat, hessian, fisher))
    return errors


def output_fisher(
    model: nn.Module, windows: torch.Tensor, linears: dict[str, nn.Linear], device: torch.device
) -> dict[str, torch.Tensor]:
    """Per target linear, the float model's empirical Fisher of each output: the mean over tokens of
    ``(∂L/∂y_o)²``, L the summed next-token cross-entropy of the calibration windows (float64, ``[out]``).

    Why: the relative error counts every layer alike, but a unit of output error costs the loss very
    differently in different layers; weighting each output's squared error by its Fisher turns the
    summed error into an estimate of the loss increase (the "Fisher information from the KD loss" of
    issue 14: at the float model the KD loss' own gradient is zero, so the LM loss stands in). One
    forward and backward per window with the whole model on ``device``; no parameter gradients (the
    parameters are frozen, the embedding output requires grad so the backward reaches every layer)."""
    sums = {n: torch.zeros(m.out_features, dtype=torch.float64, device=device) for n, m in linears.items()}
    handles = []

    def watch(name: str):
        def add(grad: torch.Tensor) -> None:  # returns None: the gradient flows on unchanged
            sums[name].add_(grad.detach().double().flatten(0, -2).square().sum(0))

        def hook(_mod: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            if out.requires_grad:
                out.register_hook(add)

        return hook

    for n, m in linears.items():
        handles.append(m.register_forward_hook(watch(n)))
    handles.append(model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out.requires_grad_(True)))
    flags = {p: p.requires_grad for p in model.parameters()}
    model_device = next(model.parameters()).device
    tokens = 0
    try:
        for p in flags:
            p.requires_grad_(False)
        model.to(device)
        for w in windows:
            ids = w[None].to(device)
            with torch.enable_grad():
                logits = model(ids).logits.float()
                loss = nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
                loss.backward()
            tokens += ids.numel()
    finally:
        remove_hooks(handles)
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.to(model_device)
    # Under DDP each rank holds its share of the windows: sum every rank's, so all ranks agree.
    count = torch.tensor([float(tokens)], dtype=torch.float64, device=device)
    D.all_reduce_sum_([*sums.values(), count])
    return {n: s / max(float(count), 1.0) for n, s in sums.items()}


FISHER_FILE = "output_fisher.safetensors"


def plan_row_weights(
    model: nn.Module,
    windows: torch.Tensor,
    linears: dict[str, nn.Linear],
    device: torch.device,
    resume_dir: str | Path | None = None,
) -> dict[str, torch.Tensor]:
    """``compression.row_weighting="fisher"``: every target linear's per-output Fisher (full name ->
    ``[out]`` float64, on the CPU), from the float model before the first block is compressed.

    Read from ``<resume_dir>/output_fisher.safetensors`` when it is there (the run folder's fingerprint
    already vouches for the model, data and config), else measured and written there by rank 0, so
    a resumed compression weighs its remaining layers exactly as the first start did."""
    from safetensors.torch import load_file, save_file

    path = Path(resume_dir) / FISHER_FILE if resume_dir else None
    stored = path is not None and path.is_file()
    D.check_same_on_all_ranks(stored, f"whether {path} exists (resume_dir must be on a filesystem all ranks share)")
    if stored:
        try:
            fisher = load_file(str(path))
        except Exception as err:  # safetensors raises its own error types for truncated files
            raise ValueError(f"{path} is corrupt ({err}); delete it to measure the Fisher again") from err
        missing = sorted(set(linears) - set(fisher))
        wrong = sorted(n for n in linears if n in fisher and fisher[n].numel() != linears[n].out_features)
        if missing or wrong:
            raise ValueError(
                f"{path} does not match the model's target linears (missing {missing[:3]}, wrong size {wrong[:3]}); "
                "delete it to measure the Fisher again"
            )
        return {n: fisher[n] for n in linears}
    fisher = {n: f.cpu() for n, f in output_fisher(model, windows, linears, device).items()}
    if path is not None:
        if D.rank() == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file({n: f.contiguous() for n, f in fisher.items()}, str(tmp))
            tmp.replace(path)
        D.barrier()
    return fisher


@torch.no_grad()
def measure_sensitivity(
    model: nn.Module,
    windows: torch.Tensor,
    config: CompressionConfig,
    keep: set[str],
    device: torch.device,
    progress: bool = False,
) -> tuple[list[LayerChoices], dict[str, list[float]]]:
    """Every target linear's options: exact bits and measured relative error on the float model.

    One forward per float block on the calibration windows fills every target's H at once (the
    block's outputs are the next block's inputs); the layers are split across ranks by cost and
    their errors broadcast, so every rank ends with the same numbers."""
    from lit_cb.compress import _target_linears, capture_block_inputs, run_block

    arch = spec_for(model)
    layers = arch.decoder_layers(model)
    targets = arch.compression_targets(config.targets)
    settings = config.bit_option_settings()
    hdtype = HESSIAN_DTYPES[config.hessian_dtype]
    run_seed = int(getattr(config.method_settings(), "seed", 0))
    model_device = next(model.parameters()).device
    fisher = None
    if config.sensitivity_weighting == "fisher":
        every = {
            arch.block_prefix(i) + n: m
            for i, block in enumerate(layers)
            for n, m in _target_linears(block, targets, arch.block_prefix(i), keep).items()
        }
        fisher = output_fisher(model, windows, every, device)
    store = torch.device("cpu") if config.offload_activations else device
    moved = arch.present_input_modules(model)
    for m in moved:
        m.to(device)
    inputs, kwargs = capture_block_inputs(model, windows, device, store)
    for m in moved:
        m.to(model_device)
    choices: list[LayerChoices] = []
    errors: dict[str, list[float]] = {}
    for i, block in enumerate(layers):
        prefix = arch.block_prefix(i)
        block.to(device)
        linears = _target_linears(block, targets, prefix, keep)
        accs, handles = attach_hessian_hooks(linears, hdtype, device)
        try:
            outputs = run_block(block, inputs, kwargs, config.forward_batch_size, device)
        finally:
            remove_hooks(handles)
        for acc in {id(a): a for a in accs.values()}.values():
            acc.all_reduce()
        owners = D.assign_owners({n: m.out_features * m.in_features for n, m in linears.items()}, D.world_size())
        mine = {
            n: measure_option_errors(
                m,
                accs[n].hessian,
                settings,
                config.sensitivity_max_rows,
                D.layer_seed(prefix + n, run_seed) % (2**62),
                device,
                None if fisher is None else fisher[prefix + n],
            )
            for n, m in linears.items()
            if owners[n] == D.rank()
        }
        for n, m in linears.items():
            errs = D.broadcast_object(mine.get(n), src=owners[n])
            errors[prefix + n] = errs
            choices.append(
                LayerChoices(prefix + n, m.in_features * m.out_features, option_costs(m, settings), tuple(errs))
            )
        del accs
        inputs = outputs
        block.to(model_device)
        if progress:
            print(f"sensitivity: block {i + 1}/{len(layers)} measured", flush=True)
    return choices, errors


def plan_bit_allocation(
    model: nn.Module,
    windows: torch.Tensor,
    config: CompressionConfig,
    keep: set[str],
    device: torch.device,
    resume_dir: str | Path | None = None,
    fingerprint: dict | None = None,
    progress: bool = False,
) -> dict:
    """The allocation record: ``choice`` (full layer name -> option index), the allocation's
    summary, each layer's option, bits and measured errors. Read from
    ``<resume_dir>/bit_allocation.json`` when it exists (made from the same config and inputs,
    else refused), otherwise measured, allocated and written there (by rank 0)."""
    path = Path(resume_dir) / ALLOCATION_FILE if resume_dir else None
    stored = path is not None and path.is_file()
    # Ranks that disagree would take different branches and hang: the file must be on a shared filesystem.
    D.check_same_on_all_ranks(stored, f"whether {path} exists (resume_dir must be on a filesystem all ranks share)")
    if stored:
        try:
            record = json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(f"{path} is corrupt ({err}); move {path.parent} away to compress from scratch") from err
        check_same(
            record.get("fingerprint"),
            fingerprint,
            f"the bit allocation in {path}",
            "Use another resume directory (run_name/output_dir), or overwrite=true to move the old run aside.",
        )
        made_with = {k: v for k, v in (record.get("config") or {}).items() if k != "blocks_from"}  # older files
        if made_with != json.loads(json.dumps(config.made_with())):
            raise ValueError(
                f"{path} was made with another compression config; use another resume directory or delete it"
            )
        D.check_same_on_all_ranks(record["choice"], f"the bit allocation read from {path}")
        record["reused"] = True
        return record
    t0 = time.perf_counter()
    choices, errors = measure_sensitivity(model, windows, config, keep, device, progress)
    allocation: Allocation = allocate(choices, config.bit_budget)
    D.check_same_on_all_ranks(allocation.choice, "the bit allocation")
    record = {
        "budget": config.bit_budget,
        "bit_options": config.bit_options,
        "weighting": config.sensitivity_weighting,
        "choice": allocation.choice,
        "allocation": allocation.to_dict(),
        "errors": errors,
        "costs": {c.name: list(c.costs) for c in choices},
        "seconds": time.perf_counter() - t0,
        "config": config.made_with(),
        "fingerprint": fingerprint,
    }
    if path is not None:
        if D.rank() == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(record, indent=1))
            tmp.replace(path)
        D.barrier()
    record["reused"] = False
    return record


def allocation_summary(record: dict) -> str:
    """One line for the log: achieved vs budget bits, status, how many layers took each option."""
    alloc = record["allocation"]
    counts: dict[int, int] = {}
    for j in record["choice"].values():
        counts[j] = counts.get(j, 0) + 1
    per_option = ", ".join(f"{record['bit_options'][j]}: {n}" for j, n in sorted(counts.items()))
    what = "Fisher-weighted" if record.get("weighting") == "fisher" else "relative"
    return (
        f"bit allocation ({alloc['status']}): {alloc['bits_per_weight']:.4f} bits/weight for a budget of "
        f"{record['budget']}; summed {what} error {alloc['error']:.4g} (lower bound {alloc['lower_bound']:.4g}); "
        f"layers per option: {per_option}"
    )
