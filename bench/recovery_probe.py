"""Where does a recovery step's time go, and how far does longer distillation get? (issue 14)

    source bench/device_setup.sh; python bench/recovery_probe.py --out $OUT

Part 1 (``--profile``): SmolLM2-135M compressed quickly (codebook g4 B8, 2 k-means iterations,
no block fine-tuning: the quality is irrelevant here, the shapes are the real ones), then
``--steps`` recovery steps of the full-protocol settings (batch 4 x 2048, bf16 autocast, KL from
the float teacher, codebooks + scales + norms trained, no LoRA) under ``torch.profiler``: the
step time and the top CUDA kernels by total time, for each variant of the step that
``--variants`` lists.

The variants are what the step could do instead: ``baseline`` (today's code), ``nodet`` (without
``torch.use_deterministic_algorithms``, whose sort-based index backward is suspected),
``fused_kl`` (KL computed in sequence chunks instead of on whole [batch, seq, vocab] float32
tensors), ``teacher_bf16`` (the teacher's weights held in bf16, not cast by autocast every step),
``indexing_grad`` (the codebook gradient by autograd through indexing, as before the sort-free
backward of :func:`lit_cb.layers.dequantize_weight`).

Everything is written to ``--out/recovery_probe.json`` as it is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def _versions() -> dict:
    import lightning
    import transformers
    import triton

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "lightning": lightning.__version__,
    }


def chunked_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """KL(teacher || student) averaged over tokens, computed ``chunk`` positions at a time."""
    total = student_logits.new_zeros((), dtype=torch.float32)
    n = student_logits.shape[0] * student_logits.shape[1]
    for s in range(0, student_logits.shape[1], chunk):
        st = F.log_softmax(student_logits[:, s : s + chunk].float(), dim=-1)
        te = F.log_softmax(teacher_logits[:, s : s + chunk].float(), dim=-1)
        total = total + F.kl_div(st.flatten(0, 1), te.flatten(0, 1), log_target=True, reduction="sum")
    return total / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--variants", default="baseline,nodet,fused_kl,teacher_bf16")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes (checks the script runs)")
    ap.add_argument("--random", action="store_true", help="random weights in SmolLM2-135M's shapes (no GGUF needed)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "versions": _versions(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python " + shlex.join(sys.argv),
        "variants": {},
    }

    def dump() -> None:
        (out / "recovery_probe.json").write_text(json.dumps(result, indent=1))

    from lit_cb.compress import compress_model
    from lit_cb.configs.compression import CompressionConfig
    from lit_cb.configs.data import DataConfig
    from lit_cb.data.datamodule import CompressionDataModule
    from lit_cb.models import load_model
    from lit_cb.recovery import RecoveryConfig, RecoveryModule, _kl_to_teacher

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    seqlen = 64 if args.smoke else args.seqlen
    t0 = time.perf_counter()
    if args.random:
        from lit_cb.models import random_smollm2

        model = random_smollm2()
        tok = type("Vocab", (), {"vocab_size": model.config.vocab_size})()
    else:
        model, tok = load_model("smollm2", "float32")
    if args.smoke:
        model.model.layers = model.model.layers[:2]
        model.config.num_hidden_layers = 2
    if args.random:
        windows = torch.randint(0, tok.vocab_size, (4, seqlen), generator=torch.Generator().manual_seed(1))
    else:
        dm = CompressionDataModule(
            tok, DataConfig(num_calibration_samples=4, calibration_seqlen=seqlen, calibration_sampling="concat")
        )
        windows = dm.calibration_windows()
    teacher = copy.deepcopy(model)
    cfg = CompressionConfig(
        method="codebook", method_config={"in_group_size": 4, "nbits": 8, "kmeans_iters": 2}, forward_batch_size=4
    )
    compress_model(model, windows, cfg, device=device, progress=False)
    result["setup_seconds"] = time.perf_counter() - t0
    dump()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, tok.vocab_size, (args.batch, seqlen), generator=gen) for _ in range(4)]

    import lit_cb.layers as layers

    sort_free = layers.dequantize_weight

    def indexing_autograd(codes, codebooks, scales, nbits):  # the gradient path before the sort-free one
        groups = layers._gather_groups(layers.unpack_codes(codes, nbits), codebooks) * scales
        return layers._groups_to_weight(groups)

    for variant in args.variants.split(","):
        torch.use_deterministic_algorithms(variant != "nodet", warn_only=True)
        layers.dequantize_weight = indexing_autograd if variant == "indexing_grad" else sort_free
        student = copy.deepcopy(model)
        rcfg = RecoveryConfig(
            max_steps=100, lora_r=0, train_codebooks=True, train_norms=True, distill_alpha=1.0, codebook_lr=5e-5
        )
        module = RecoveryModule(student, rcfg, teacher=teacher).to(device)
        module.configure_model()
        teacher.to(device).eval()
        if variant == "teacher_bf16":
            teacher.to(torch.bfloat16)
        opt = module.configure_optimizers()["optimizer"]
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

        def step(i: int, module=module, opt=opt, autocast=autocast, variant=variant) -> float:
            ids = batches[i % len(batches)].to(device)
            with autocast:
                logits = module(ids)
                with torch.no_grad():
                    t_logits = teacher(input_ids=ids, use_cache=False).logits
                if variant == "fused_kl":
                    loss = chunked_kl(logits, t_logits)
                else:
                    loss = _kl_to_teacher(logits, t_logits, 1.0)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.requires_grad], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss)

        try:
            for i in range(3):  # warm-up
                step(i)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            losses = [step(i) for i in range(args.steps)]
            if device.type == "cuda":
                torch.cuda.synchronize()
            sec = (time.perf_counter() - t) / args.steps
            acts = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=acts) as prof:
                for i in range(3):
                    step(i)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
            table = prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60)
            result["variants"][variant] = {
                "seconds_per_step": sec,
                "tokens_per_second": args.batch * seqlen / sec,
                "losses": losses,
                "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
                "profile_top": table.splitlines(),
            }
            print(variant, f"{sec * 1000:.1f} ms/step", flush=True)
            print(table, flush=True)
        except Exception as err:  # one variant failing must not lose the others
            result["variants"][variant] = {"error": repr(err)}
            print(variant, "failed:", repr(err), flush=True)
        dump()
        teacher.float()
        del module, student, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
