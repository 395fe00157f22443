"""Recovery's training step eager against CUDA graphs (``recovery.cuda_graphs``, lit_cb/step_graphs.py), with
the Lightning Trainer, on a SmolLM2-shaped trellis model (issue 14: the trellis recovered at about 1 step/s on
the H100, bound by Python and launches, which decides how many seeds of an 800-step schedule fit a session).

    python bench/recovery_graphs_bench.py --out $OUT/recovery_graphs_h100.json   # about 2 minutes on the H100
    python bench/recovery_graphs_bench.py --smoke --out /tmp/g.json              # CPU, eager stand-in captures

Student: SmolLM2-135M's shapes with random weights, every block linear a TrellisLinear with random codes
(:func:`bench.trellis_step_bench.trellis_model`); teacher: the float random model. The recovery settings are
``configs/smollm2_trellis_lora4q8_long.yaml``'s (rank-4 LoRA on every compressed linear, scales, norms and the
tied embedding trained, pure KL from the teacher, bf16-mixed, clipping at 1), on random token batches of
``--batch x --seqlen``. Each variant trains ``--steps`` steps from the same weights and seed; the figure is the
median step time after ``--warmup`` steps (the first graphed step includes the capture and its self-check,
reported apart), and both variants' per-step KL losses are recorded: graphs must reproduce eager's curve to
bf16 rounding, since they replay the same kernels. ``--smoke`` runs the plumbing on the CPU with eager
stand-ins for the captures (no timing).
"""

from __future__ import annotations

import copy
import pathlib
import statistics
import sys
import time

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.kernel_bench import result_header, write_json  # noqa: E402
from bench.trellis_step_bench import step_bench_args, trellis_model  # noqa: E402


def recovery_config(steps: int, graphs: bool):
    from lit_cb.configs.recovery import RecoveryConfig

    return RecoveryConfig(
        max_steps=steps, lr=2e-4, codebook_lr=3e-5, warmup_steps=min(40, steps), lora_r=4, lora_alpha=8,
        low_rank_bits=8, lora_on_compressed=True, train_embeddings=True, embedding_lr=1e-4, train_codebooks=True,
        train_norms=True, distill_alpha=1.0, cuda_graphs=graphs,
    )  # fmt: skip


class StepTimes:
    """Wall time of every training step (synchronized on a GPU), and its KL loss."""

    def __init__(self) -> None:
        import lightning as L

        class _CB(L.Callback):
            def on_train_batch_start(cb, trainer, pl_module, batch, batch_idx) -> None:  # noqa: N805
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self._t = time.perf_counter()

            def on_train_batch_end(cb, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: N805
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.ms.append((time.perf_counter() - self._t) * 1e3)
                self.loss.append(float(outputs["loss"]))

        self.ms: list[float] = []
        self.loss: list[float] = []
        self.callback = _CB()


def run_variant(student0, teacher, args, graphs: bool, device: str) -> dict:
    import lightning as L

    from lit_cb.recovery import RecoveryModule
    from lit_cb.step_graphs import StepGraphs

    L.seed_everything(0, verbose=False)
    student = copy.deepcopy(student0)
    module = RecoveryModule(student, recovery_config(args.steps, graphs and not args.smoke), teacher=teacher)
    if graphs and args.smoke:  # the plumbing with eager stand-ins for the captures (no CUDA here)
        module.configure_model()
        module.step_graphs = StepGraphs(
            module.model, teacher, capture_student=lambda m, sample: m, capture_teacher=lambda f, sample: f
        )
    gen = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 49152, (args.batch, args.seqlen), generator=gen)} for _ in range(8)]
    times = StepTimes()
    trainer = L.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision="bf16-mixed" if device == "cuda" else 32,
        max_steps=args.steps, gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[times.callback],
    )  # fmt: skip
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    row = {
        "fit_s": time.perf_counter() - t,
        "step_ms_median": statistics.median(times.ms[args.warmup :]),
        "first_step_ms": times.ms[0],
        "step_ms_all": times.ms,
        "kl_per_step": times.loss,
    }
    if device == "cuda":
        row["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    if module.step_graphs is not None:
        row["cuda_graphs"] = module.step_graphs.status.to_dict()
    return row


def main() -> None:
    args, device = step_bench_args(
        __doc__,
        30,
        "CPU, 2 blocks, 2 x 32 tokens, eager stand-in captures",
        lambda p: p.add_argument("--warmup", type=int, default=5, help="steps left out of the median"),
    )
    if args.smoke:
        args.steps, args.warmup = 3, 1
    if not 0 <= args.warmup < args.steps:
        sys.exit(f"--warmup {args.warmup} must lie in [0, --steps={args.steps})")
    if device == "cuda":
        from lit_cb.pipeline import use_deterministic_kernels

        use_deterministic_kernels()  # as the pipeline runs recovery (trainer.deterministic defaults to true)
    from lit_cb.models import random_smollm2

    doc = result_header("recovery's training step, eager against CUDA graphs (Lightning Trainer)", args.smoke)
    doc["timing"] = f"median wall time of steps {args.warmup}..{args.steps - 1} (synchronized), Trainer callbacks"
    doc.update(layers=args.layers, tokens=args.batch * args.seqlen, steps=args.steps, variants={})
    teacher = random_smollm2(num_layers=args.layers).to(device)
    student = trellis_model(args.layers, device)
    for name, graphs in (("eager", False), ("graphs", True)):
        row = run_variant(student, teacher, args, graphs, device)
        doc["variants"][name] = row
        print(name, {k: v for k, v in row.items() if k not in ("step_ms_all", "kl_per_step")}, flush=True)
        write_json(args.out, doc)
    eager, graphed = doc["variants"]["eager"], doc["variants"]["graphs"]
    doc["speedup"] = eager["step_ms_median"] / graphed["step_ms_median"]
    diffs = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(eager["kl_per_step"], graphed["kl_per_step"], strict=True)]
    doc["kl_max_rel_diff"] = max(diffs)
    status = graphed.get("cuda_graphs", {})
    # bf16 kernels that sum with atomics drift apart over steps; far apart would mean another function
    doc["passed"] = doc["kl_max_rel_diff"] < 0.05 and (args.smoke or status.get("student") == "on")
    print("speedup", round(doc["speedup"], 3), "kl max rel diff", doc["kl_max_rel_diff"], "passed", doc["passed"])
    write_json(args.out, doc)
    sys.exit(0 if doc["passed"] else 1)


if __name__ == "__main__":
    main()
