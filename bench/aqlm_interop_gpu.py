"""Exported AQLM folders on the GPU: stock transformers + the real ``aqlm`` package (its CUDA /
Triton kernels) against lit_cb's own kernels on the same tensors.

For each format a small Llama gets CodebookLinear layers with random codes, is saved by lit_cb,
exported with ``lit_cb.interop.aqlm.export_aqlm`` and loaded by ``AutoModelForCausalLM
.from_pretrained`` in float16. Logits of one token (aqlm's gemv kernels) and of a 2 x 32 batch
(its gemm path) are compared with lit_cb's model (float16, its Triton kernels) and with a float64
dense reference; the JSON records the differences, which aqlm kernel ran, and any error per format.

    python bench/aqlm_interop_gpu.py --out $OUT/aqlm_interop_gpu.json          # GPU, ~1-3 min
    python bench/aqlm_interop_gpu.py --smoke --out /tmp/aqlm_interop_smoke.json  # CPU, float32
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from torch import nn

FORMATS = {"1x16_g8": (1, 16, 8), "2x8_g8": (2, 8, 8), "1x8_g8": (1, 8, 8)}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_model(m: int, b: int, g: int, hidden: int, intermediate: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lit_cb.layers import CodebookFormat, CodebookLinear

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=1024,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    for name, lin in list(model.named_modules()):
        if isinstance(lin, nn.Linear) and name.endswith(TARGETS):
            fmt = CodebookFormat(lin.in_features, lin.out_features, g, 1, m, b)
            codes = torch.randint(0, 2**b, (fmt.num_out_groups, fmt.num_in_groups, m), generator=gen)
            codebooks = torch.randn(m, 2**b, 1, g, generator=gen) * (0.5 / (lin.in_features**0.5 * m**0.5))
            scales = torch.rand(fmt.num_out_groups, generator=gen) + 0.5
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, CodebookLinear.from_tensors(fmt, codes, codebooks, scales))
    return model


def dense_reference(model: nn.Module) -> nn.Module:
    """The same model with every CodebookLinear replaced by a float64 nn.Linear of its weight."""
    import copy

    from lit_cb.layers import CodebookLinear

    ref = copy.deepcopy(model).double()
    for name, mod in list(ref.named_modules()):
        if isinstance(mod, CodebookLinear):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=False, dtype=torch.float64)
            lin.weight.data.copy_(mod.dequantize().double())
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent), child, lin)
    return ref


def kernel_names(hf_model: nn.Module) -> list[str]:
    """Which aqlm forward kernel each distinct QuantizedLinear selected (after a forward)."""
    from aqlm import QuantizedLinear

    names = set()
    for mod in hf_model.modules():
        if isinstance(mod, QuantizedLinear) and mod.gemv_op is not None:
            from aqlm.inference_kernels import get_forward_pass_kernel

            for training in (False, True):
                k = get_forward_pass_kernel(mod.codebooks, training)
                names.add(f"{'gemm' if training else 'gemv'}:{getattr(k, '__name__', str(k))}")
    return sorted(names)


def run_format(fmt_id: str, device: str, dtype: torch.dtype, hidden: int, intermediate: int, work: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from lit_cb.interop.aqlm import export_aqlm
    from lit_cb.serialization import load_compressed, save_compressed

    m, b, g = FORMATS[fmt_id]
    model = build_model(m, b, g, hidden, intermediate)
    save_compressed(model, work / fmt_id / "lit")
    t = time.perf_counter()
    export_aqlm(work / fmt_id / "lit", work / fmt_id / "aqlm")
    export_s = time.perf_counter() - t
    lit, _, _ = load_compressed(work / fmt_id / "lit")
    ref = dense_reference(lit)
    lit = lit.to(device=device, dtype=dtype)
    hf = AutoModelForCausalLM.from_pretrained(work / fmt_id / "aqlm", dtype=dtype).to(device)
    gen = torch.Generator().manual_seed(1)
    result: dict = {"format": fmt_id, "export_s": round(export_s, 3)}
    for label, shape in (("one_token", (1, 1)), ("batch_2x32", (2, 32))):
        ids = torch.randint(0, 1024, shape, generator=gen)
        with torch.no_grad():
            want = ref(ids).logits
            got_hf = hf(ids.to(device)).logits.double().cpu()
            got_lit = lit(ids.to(device)).logits.double().cpu()
        scale = float(want.abs().max())
        result[label] = {
            "logit_scale": scale,
            "aqlm_vs_float64_max_abs": float((got_hf - want).abs().max()),
            "lit_cb_vs_float64_max_abs": float((got_lit - want).abs().max()),
            "aqlm_vs_lit_cb_max_abs": float((got_hf - got_lit).abs().max()),
        }
        result[label]["ok"] = result[label]["aqlm_vs_lit_cb_max_abs"] <= 1e-2 * scale
    result["aqlm_kernels"] = kernel_names(hf)
    result["ok"] = all(result[k]["ok"] for k in ("one_token", "batch_2x32"))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--smoke", action="store_true", help="CPU, float32, tiny shapes")
    args = parser.parse_args(argv)

    import aqlm
    import transformers
    import triton

    if args.smoke:
        import numba

        numba.set_num_threads(1)  # aqlm 1.1.7's CPU kernel races with more threads (Vahe1994/AQLM#86)
        device, dtype, hidden, intermediate = "cpu", torch.float32, 64, 128
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA device; use --smoke on a CPU", file=sys.stderr)
            return 2
        device, dtype, hidden, intermediate = "cuda", torch.float16, 512, 1024
    record = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "versions": {
            "torch": torch.__version__,
            "triton": triton.__version__,
            "transformers": transformers.__version__,
            "aqlm": getattr(aqlm, "__version__", None) or _dist_version("aqlm"),
        },
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, *sys.argv]),
        "dtype": str(dtype).removeprefix("torch."),
        "shapes": {"hidden": hidden, "intermediate": intermediate, "layers": 2},
        "tolerance": "aqlm vs lit_cb max |diff| <= 1e-2 * max |float64 logit|",
        "results": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for fmt_id in FORMATS:
            try:
                res = run_format(fmt_id, device, dtype, hidden, intermediate, Path(tmp))
            except Exception as err:  # record and go on: one format's kernel build must not hide the others
                res = {"format": fmt_id, "ok": False, "error": f"{type(err).__name__}: {err}"}
                res["traceback"] = traceback.format_exc(limit=8)
            print(json.dumps({k: v for k, v in res.items() if k != "traceback"}))
            record["results"].append(res)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    return 0 if all(r["ok"] for r in record["results"]) else 1


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
