"""One recovery-sized training step of a trellis model, timed with the training rotation's two knobs on and off
(issue 14: the trellis recovered at about 1 step/s on the H100, against about 2.5 for the codebook, which decides
how many seeds of an 800-step schedule fit in a session).

    python bench/trellis_step_bench.py --out $OUT/trellis_step_h100.json          # about a minute on the H100
    python bench/trellis_step_bench.py --smoke --out /tmp/s.json                  # CPU, 2 blocks, 64 tokens

The model is SmolLM2-135M's shapes with random weights (:func:`lit_cb.models.random_smollm2`), every q/k/v/o,
gate/up/down a :class:`lit_cb.trellis.TrellisLinear` with random codes and trainable row scales (what recovery
trains besides LoRA, norms and the embedding). One step is the student's part of a recovery step: forward of
``batch x seqlen`` tokens under bf16 autocast, a loss on the logits, backward (the float teacher's forward and
the optimizer are not included). Variants (``lit_cb.trellis`` knobs):

- ``factored``: every layer rotates its own input by the factored transform (signs, Hadamard groups, mix): the
  path of every run before this bench.
- ``shared``: layers reading one tensor (q/k/v, gate/up) share its rotation (``SHARE_TRAINING_ROTATIONS``).
- ``dense``: widths up to 1024 rotate by one dense matmul (``DENSE_TRAINING_ROTATION_MAX``).
- ``shared_dense``: both (the default).

Each variant: the step's median time over ``--steps`` (CUDA events) and its peak memory; the variants' gradients
of the row scales must agree (they compute one function). The default variant is also profiled
(``torch.profiler``): the CUDA kernels with the most total time, and the step's wall time against the kernels'
total, which says whether the step waits on the GPU or on Python and launches. On a GPU the default variant is
also run from CUDA graphs (``graphed``: the forward and backward captured once and replayed), which says what
graphs would save a recovery.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.kernel_bench import result_header, write_json  # noqa: E402

VARIANTS = {"factored": (0, False), "shared": (0, True), "dense": (1024, False), "shared_dense": (1024, True)}


def trellis_model(num_layers: int, device: str) -> torch.nn.Module:
    """SmolLM2-shaped, every block linear a TrellisLinear with random codes and trainable scales (only those)."""
    from lit_cb.compress import _set_submodule
    from lit_cb.models import random_smollm2
    from lit_cb.trellis import TrellisFormat, TrellisLinear

    model = random_smollm2(num_layers=num_layers)
    gen = torch.Generator().manual_seed(0)
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, torch.nn.Linear) or name == "lm_head":
            continue
        layer = TrellisLinear(TrellisFormat(mod.in_features, mod.out_features), dtype=torch.float32)
        layer.codes.copy_(torch.randint(0, 4, layer.codes.shape, generator=gen).to(torch.uint8))
        layer.scales.data.copy_((torch.rand(mod.out_features, 1, generator=gen) + 0.5) * 0.02)
        _set_submodule(model, name, layer)
    for p in model.parameters():
        p.requires_grad_(False)
    for mod in model.modules():
        if isinstance(mod, TrellisLinear):
            mod.scales.requires_grad_(True)
    return model.to(device)


def step(model, ids: torch.Tensor, device: str) -> None:
    model.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        logits = model(ids).logits
    logits.float().logsumexp(-1).mean().backward()


def scale_grads(model) -> torch.Tensor:
    from lit_cb.trellis import TrellisLinear

    return torch.cat([m.scales.grad.flatten().float() for m in model.modules() if isinstance(m, TrellisLinear)])


def step_bench_args(doc: str, steps: int, smoke_help: str, extra=None) -> tuple[argparse.Namespace, str]:
    """The command line of a training-step bench on the SmolLM2-shaped trellis model (this one and
    bench/recovery_graphs_bench.py) and its device: ``--smoke`` is the CPU with 2 blocks of 2 x 32 tokens and 2-3
    steps; otherwise a GPU. ``extra(parser)`` adds a bench's own options."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--smoke", action="store_true", help=smoke_help)
    if extra is not None:
        extra(p)
    args = p.parse_args()
    if args.out and pathlib.Path(args.out).exists():
        p.error(f"--out {args.out} exists; choose another path (nothing is overwritten)")
    if args.smoke:
        args.layers, args.batch, args.seqlen = 2, 2, 32
        return args, "cpu"
    if not torch.cuda.is_available():
        sys.exit("no GPU: use --smoke on a CPU")
    return args, "cuda"


def main() -> None:
    args, device = step_bench_args(__doc__, 10, "CPU, 2 blocks, 2 x 32 tokens: the code path only")
    if args.smoke:
        args.steps = 2
    from lit_cb import trellis

    doc = result_header("a trellis model's training step (student forward + backward), rotation knobs", args.smoke)
    doc["timing"] = "median of --steps steps after 2 warm-up steps (CUDA events); peak memory per variant"
    doc.update(layers=args.layers, tokens=args.batch * args.seqlen, variants={})
    model = trellis_model(args.layers, device)
    ids = torch.randint(0, 49152, (args.batch, args.seqlen), generator=torch.Generator().manual_seed(1)).to(device)
    grads = {}
    for name, (dense_max, share) in VARIANTS.items():
        trellis.DENSE_TRAINING_ROTATION_MAX, trellis.SHARE_TRAINING_ROTATIONS = dense_max, share
        times = []
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for i in range(args.steps + 2):
            start = time.perf_counter()
            if device == "cuda":
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
            step(model, ids, device)
            if device == "cuda":
                end.record()
                torch.cuda.synchronize()
                ms = begin.elapsed_time(end)
            else:
                ms = (time.perf_counter() - start) * 1e3
            if i >= 2:
                times.append(ms)
        grads[name] = scale_grads(model)
        row = {"dense_training_rotation_max": dense_max, "share_training_rotations": share,
               "step_ms": statistics.median(times), "step_ms_all": times}  # fmt: skip
        if device == "cuda":
            row["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
        ref = grads["factored"]
        row["scale_grad_rel_diff_vs_factored"] = ((grads[name] - ref).abs().max() / ref.abs().max()).item()
        doc["variants"][name] = row
        print(name, {k: v for k, v in row.items() if k != "step_ms_all"}, flush=True)
        write_json(args.out, doc)
    if device == "cuda":
        trellis.DENSE_TRAINING_ROTATION_MAX, trellis.SHARE_TRAINING_ROTATIONS = VARIANTS["shared_dense"]
        doc["graphed"] = graphed_variant(model, ids, args.steps, grads["factored"])
        print("graphed", {k: v for k, v in doc["graphed"].items() if k != "step_ms_all"}, flush=True)
        write_json(args.out, doc)
    base = doc["variants"]["factored"]["step_ms"]
    doc["speedup_vs_factored"] = {n: base / v["step_ms"] for n, v in doc["variants"].items()}
    # bf16 autocast: the variants round differently; far apart would mean they compute different functions
    doc["passed"] = all(v["scale_grad_rel_diff_vs_factored"] < 0.05 for v in doc["variants"].values())
    trellis.DENSE_TRAINING_ROTATION_MAX, trellis.SHARE_TRAINING_ROTATIONS = VARIANTS["shared_dense"]
    try:  # on the CPU too (smoke), so that CI runs the profiler's code path
        doc["profile_shared_dense"] = profile_step(model, ids, device)
    except Exception as err:  # the timings above are the result; a profiler problem must not lose them
        doc["profile_shared_dense"] = {"error": f"{type(err).__name__}: {err}"}
    print("speedup vs factored:", doc["speedup_vs_factored"], "passed:", doc["passed"], flush=True)
    write_json(args.out, doc)
    sys.exit(0 if doc["passed"] else 1)


def graphed_variant(model, ids: torch.Tensor, steps: int, ref_grads: torch.Tensor) -> dict:
    """The default variant with the student's forward and backward captured as CUDA graphs
    (``torch.cuda.make_graphed_callables``): what replaying the step's ~7,000 launches from one graph saves when
    Python and launches, not the GPU, bound the step (the profile below). A measurement for the recovery's next
    lever; a capture that fails (a host sync inside the model, say) is recorded, not raised."""

    class Logits(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            # graphs need autocast's weight cache off: a cached cast would be a tensor made outside the graph
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                return self.inner(tokens, use_cache=False).logits

    try:
        graphed = torch.cuda.make_graphed_callables(Logits(model), (ids,), num_warmup_iters=3)
    except Exception as err:  # noqa: BLE001  (the result says why)
        import traceback

        return {"error": f"{type(err).__name__}: {err}"[:2000], "traceback": traceback.format_exc()[-4000:]}
    times = []
    for i in range(steps + 2):
        model.zero_grad(set_to_none=True)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graphed(ids).float().logsumexp(-1).mean().backward()
        end.record()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(begin.elapsed_time(end))
    got = scale_grads(model)
    return {
        "step_ms": statistics.median(times),
        "step_ms_all": times,
        "scale_grad_rel_diff_vs_factored": ((got - ref_grads).abs().max() / ref_grads.abs().max()).item(),
    }


def profile_step(model, ids: torch.Tensor, device: str) -> dict:
    """One step under ``torch.profiler``: wall time, the CUDA kernels' total and the 15 kernels with the most."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        wall = time.perf_counter()
        step(model, ids, device)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - wall
    events = prof.key_averages()
    top = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:15]
    print(events.table(sort_by="self_device_time_total", row_limit=15), flush=True)
    return {
        "wall_ms": wall * 1e3,
        # the kernels' own rows only: an aten op's self device time is its kernels' again
        "cuda_kernel_ms": sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 1e3,
        "top_cuda": [{"name": e.key[:120], "ms": e.self_device_time_total / 1e3, "calls": e.count} for e in top],
    }


if __name__ == "__main__":
    main()
