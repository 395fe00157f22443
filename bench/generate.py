"""Prefill and decode tokens/s of ``lit_cb generate``'s code path for compressed and baseline models:
``--compile graph`` (the default, as ``lit_cb generate`` on a GPU: lit_cb's static-cache loop replaying one
captured CUDA graph per token), or ``cudagraphs`` / ``inductor`` (transformers' generate, static KV cache,
fullgraph torch.compile of the decode step of that backend), or ``off`` (transformers' generate, eager).

    source bench/device_setup.sh && python bench/generate.py --out $OUT/generate_h100.json
    python bench/generate.py --smoke --out /tmp/generate_smoke.json      # CPU, tiny shapes, a few minutes

Rows (``--rows``, default all but the optional AQLM export):

* ``smollm2_fp16``, ``smollm2_nf4`` (bitsandbytes through transformers' BitsAndBytesConfig),
  ``smollm2_codebook`` (g4 B8), ``smollm2_aqlm`` (2x8 g8): the real SmolLM2-135M-Instruct; the two
  compressed ones are compressed here with a quick config (16 x 512-token calibration windows, no block
  fine-tuning: speed does not depend on quality) unless ``--codebook-dir`` / ``--aqlm-dir`` give lit_cb
  folders (pipeline outputs' ``model/``), and are loaded back with ``from_pretrained`` as users load them;
* ``smollm2_aqlm_export`` (only with ``--aqlm-export``): the AQLM model exported to the official AQLM
  format (``lit_cb.interop.aqlm.export_aqlm``) and loaded by stock transformers + the ``aqlm`` package;
* ``llama7b_fp16``, ``llama7b_nf4``, ``llama7b_2x8_g8``, ``llama7b_1x8_g4``: a LLaMA-7B-shaped
  ``LlamaForCausalLM`` built from a config, its seven projections per block swapped for ``CodebookLinear``
  layers with random codes (``bench/decode_7b.py``'s factory; no calibration) or for decode_7b's NF4
  layers, embedding and lm_head fp16.

Each result records the ``compile`` asked for and the ``compile_backend`` it actually ran with: ``graph``
(replayed CUDA graph), ``graph-eager`` (the same loop run eagerly: a CPU, or a capture that failed, with
the warning kept), a torch.compile backend, or None (eager). transformers does not torch.compile models it
quantized with bitsandbytes or aqlm (``is_compileable`` is False for them), so under ``cudagraphs`` /
``inductor`` ``smollm2_nf4`` and ``smollm2_aqlm_export`` decode eagerly; ``llama7b_nf4`` holds its NF4
layers itself, so it goes through the same compile as the other 7B rows.

Each row runs batch 1 and 16 (``--batches``) with a ``--prompt-tokens`` prompt (real text for SmolLM2,
random ids for the 7B shape) and exactly ``--new-tokens`` new tokens (end of sequence ignored): one
untimed generation (which also compiles, or captures), then a timed one. Prefill tok/s = batch * prompt
tokens / time to the first new token; decode tok/s = batch * (new tokens - 1) / the rest (the graph capture
between the two is not timed, as torch.compile's compilation is not). Under ``graph`` each result also
compares the first 32 greedy tokens with the same loop run eagerly (``graph_vs_eager_same_tokens``: the
share equal; ``graph_vs_eager_same_prefix``: the shortest equal prefix over the batch rows).
``cudagraphs`` compiles in seconds; ``inductor`` also fuses elementwise ops but takes about a minute a
compile (a dozen compiles here). The JSON is rewritten after every row, so an interrupted run keeps what
it measured.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import platform
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHECK_TOKENS = 32  # greedy tokens compared between the replayed graph and the eager loop
SMOLLM2_ROWS = ("smollm2_fp16", "smollm2_nf4", "smollm2_codebook", "smollm2_aqlm")
LLAMA7B_ROWS = {"llama7b_fp16": None, "llama7b_nf4": "nf4", "llama7b_2x8_g8": "2x8_g8", "llama7b_1x8_g4": "1x8_g4"}
QUICK = {
    "codebook": {"in_group_size": 4, "nbits": 8, "kmeans_iters": 10},
    "aqlm": {  # configs/smollm2_aqlm.yaml's CPU-sized settings
        "num_codebooks": 2,
        "nbits_per_codebook": 8,
        "in_group_size": 8,
        "beam_size": 2,
        "max_epochs": 1,
        "codebook_steps": 20,
        "init_kmeans_iters": 4,
    },
}
SMOKE_QUICK = {
    "codebook": {"in_group_size": 4, "nbits": 4, "kmeans_iters": 2},
    "aqlm": {**QUICK["aqlm"], "nbits_per_codebook": 4, "codebook_steps": 3, "init_kmeans_iters": 2},
}


def _load_by_path(name: str):
    """A sibling bench script as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _no_stop(model) -> None:
    """Exactly max_new_tokens tokens: no end-of-sequence stop; a pad id so transformers does not warn."""
    gc_ = model.generation_config
    gc_.pad_token_id = gc_.pad_token_id if gc_.pad_token_id is not None else 0
    gc_.eos_token_id = None


def measure(model, tokenizer, prompt_ids: torch.Tensor, batch: int, new_tokens: int, backend: str | None) -> dict:
    """One untimed generation (compilation, autotuning, allocator warm-up), then a timed one."""
    import torch._dynamo

    from lit_cb.generate import generate

    torch._dynamo.reset()  # a fresh compile per (model, batch): dynamo's recompile limit is per code object
    ids = prompt_ids.expand(batch, -1).contiguous()
    warnings: list[str] = []
    t = time.perf_counter()
    generate(model, tokenizer, ids, max_new_tokens=new_tokens, compile_backend=backend, warn=warnings.append)
    first = time.perf_counter() - t
    # a failed torch.compile falls back to eager generate; the graph loop falls back inside each call
    used = None if warnings and backend != "graph" else backend
    new, stats = generate(model, tokenizer, ids, max_new_tokens=new_tokens, compile_backend=used, warn=warnings.append)
    torch._dynamo.reset()
    check = {}
    if stats.compile_backend == "graph":
        # the replayed graph against the same loop run eagerly: the first CHECK_TOKENS greedy tokens per row
        n = min(new_tokens, CHECK_TOKENS)
        eager, _ = generate(model, tokenizer, ids, max_new_tokens=n, compile_backend="graph", capture=False)
        same = (new[:, :n] == eager).float()
        check = {
            "graph_vs_eager_same_tokens": round(same.mean().item(), 3),
            "graph_vs_eager_same_prefix": int(same.cumprod(1).sum(1).min().item()),
        }
    return {
        "batch": batch,
        "prompt_tokens": prompt_ids.shape[1],
        "new_tokens": new_tokens,
        "prefill_tok_s": round(stats.prefill_tok_s, 1),
        "decode_tok_s": round(stats.decode_tok_s, 1),
        "prefill_s": round(stats.prefill_seconds, 4),
        "decode_s": round(stats.decode_seconds, 4),
        "compile": backend or "off",
        "compile_backend": stats.compile_backend,
        "first_run_s": round(first, 1),
        "warnings": warnings,
        **check,
    }


# ---- models ---------------------------------------------------------------------------------------------


def smollm2_source(smoke: bool, workdir: Path) -> str:
    """The float model to start from: the embedded SmolLM2, or (smoke) a tiny random Llama folder."""
    if not smoke:
        return "smollm2"
    from transformers import LlamaConfig, LlamaForCausalLM

    from lit_cb.models import load_model

    _, tokenizer = load_model("smollm2")  # the real tokenizer, so prompts are real text
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    path = workdir / "tiny_float"
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def compress_here(source: str, method: str, smoke: bool, device: torch.device, workdir: Path) -> Path:
    """A lit_cb folder of ``source`` compressed with the quick config (saved as the pipeline saves)."""
    from lit_cb.compress import CompressionConfig, compress_model
    from lit_cb.data import CompressionDataModule, DataConfig
    from lit_cb.models import load_model
    from lit_cb.serialization import save_compressed

    model, tokenizer = load_model(source, "float32")
    data = DataConfig(num_calibration_samples=4 if smoke else 16, calibration_seqlen=64 if smoke else 512)
    windows = CompressionDataModule(tokenizer, data).calibration_windows()
    cfg = CompressionConfig(method=method, method_config=(SMOKE_QUICK if smoke else QUICK)[method])
    t = time.perf_counter()
    compress_model(model, windows, cfg, device=str(device), progress=False)
    print(f"compressed {source} with {method} in {time.perf_counter() - t:.0f} s", flush=True)
    return save_compressed(model, workdir / method, tokenizer)


def load_nf4(source: str, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from lit_cb.models import cache_dir, load_model

    if source == "smollm2":
        load_model("smollm2")  # makes sure the safetensors cache exists
        source = str(cache_dir() / "smollm2-safetensors")
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float16)
    model = AutoModelForCausalLM.from_pretrained(
        source, quantization_config=bnb, dtype=torch.float16, device_map=str(device)
    )
    return model.eval(), AutoTokenizer.from_pretrained(source)


def llama7b_shaped(fmt: str | None, device: torch.device, smoke: bool):
    """A LLaMA-7B-shaped LlamaForCausalLM (smoke: 2 blocks of width 64) with random weights, its block
    projections swapped for random ``CodebookLinear`` layers of ``fmt`` (``nf4``: bitsandbytes NF4 layers;
    None: fp16 linears)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    d7 = _load_by_path("decode_7b")
    hidden, mlp, layers, heads, vocab = (
        (64, 128, 2, 4, 256) if smoke else (d7.HIDDEN, d7.MLP, d7.LAYERS, d7.HEADS, d7.VOCAB)
    )
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16)
        if fmt is not None:
            make = d7.NF4Linear if fmt == "nf4" else d7.codebook_linear_factory(*d7.FORMATS[fmt], device=str(device))
            for layer in model.model.layers:
                for parent, names in (
                    (layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                    (layer.mlp, ("gate_proj", "up_proj", "down_proj")),
                ):
                    for name in names:
                        old = getattr(parent, name)
                        setattr(parent, name, make(old.in_features, old.out_features))
                        del old
    return model.eval()


# ---- main -----------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="JSON file to write")
    p.add_argument("--rows", default=",".join((*SMOLLM2_ROWS, *LLAMA7B_ROWS)))
    p.add_argument("--batches", default="1,16")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument(
        "--compile",
        "--compile-backend",
        dest="compile",
        choices=("graph", "cudagraphs", "inductor", "off"),
        default="graph",
        help="decode path (default graph, as lit_cb generate on a GPU; on a CPU, --smoke, the graph loop runs eagerly)",
    )
    p.add_argument(
        "--codebook-dir", default=None, help="lit_cb folder of a codebook g4 B8 SmolLM2 (else compressed here)"
    )
    p.add_argument("--aqlm-dir", default=None, help="lit_cb folder of an AQLM 2x8 g8 SmolLM2 (else compressed here)")
    p.add_argument("--aqlm-export", action="store_true", help="add the AQLM-format export row (needs the aqlm package)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, few tokens, eager: checks the script runs")
    args = p.parse_args()

    rows = [r for r in args.rows.split(",") if r]
    if args.aqlm_export and "smollm2_aqlm_export" not in rows:
        rows.append("smollm2_aqlm_export")
    known = (*SMOLLM2_ROWS, "smollm2_aqlm_export", *LLAMA7B_ROWS)
    unknown = [r for r in rows if r not in known]
    if unknown:
        p.error(f"unknown rows {unknown}; known: {', '.join(known)}")
    for flag in ("codebook_dir", "aqlm_dir"):
        folder = getattr(args, flag)
        if folder and not (Path(folder) / "config.json").is_file():
            p.error(f"--{flag.replace('_', '-')} {folder}: no config.json there")
    if args.smoke:
        device, batches, new_tokens, prompt_tokens = torch.device("cpu"), [1, 2], 6, 16
        backend = None if args.compile == "off" else args.compile
        rows = [r for r in rows if r not in ("smollm2_nf4", "llama7b_nf4", "smollm2_aqlm_export")]  # GPU only
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            p.error("no GPU visible; use --smoke for a CPU check")
        device, batches = torch.device("cuda"), [int(b) for b in args.batches.split(",")]
        new_tokens, prompt_tokens = args.new_tokens, args.prompt_tokens
        backend = None if args.compile == "off" else args.compile

    import transformers
    import triton

    import lit_cb  # noqa: F401  registers quant_method lit_cb
    from lit_cb.data.texts import read_eval_text
    from lit_cb.generate import load

    out: dict = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})",
        "versions": {
            "torch": torch.__version__,
            "triton": triton.__version__,
            "transformers": transformers.__version__,
        },
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python " + shlex.join(sys.argv),
        "settings": {
            "batches": batches,
            "new_tokens": new_tokens,
            "prompt_tokens": prompt_tokens,
            "compile_backend": backend,
            "smoke": args.smoke,
            "quick_configs": SMOKE_QUICK if args.smoke else QUICK,
        },
        "rows": {},
    }

    def write() -> None:
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(out, indent=1))

    workdir = Path(tempfile.mkdtemp(prefix="lit_cb_bench_generate_"))
    source = smollm2_source(args.smoke, workdir)
    text_prompt = None
    folders: dict[str, Path] = {}
    for row in rows:
        t = time.perf_counter()
        entry: dict = {}
        try:
            if row.startswith("smollm2"):
                if row == "smollm2_fp16":
                    model, tokenizer = load(source, device, torch.float16 if device.type == "cuda" else torch.float32)
                elif row == "smollm2_nf4":
                    model, tokenizer = load_nf4(source, device)
                else:
                    method = "codebook" if row == "smollm2_codebook" else "aqlm"
                    if method not in folders:
                        given = args.codebook_dir if method == "codebook" else args.aqlm_dir
                        folders[method] = (
                            Path(given) if given else compress_here(source, method, args.smoke, device, workdir)
                        )
                        entry["folder"] = str(folders[method])
                    if row == "smollm2_aqlm_export":
                        from lit_cb.interop.aqlm import export_aqlm  # the other helper's module; optional row

                        export_dir = workdir / "aqlm_export"
                        export_aqlm(folders["aqlm"], export_dir)
                        from transformers import AutoModelForCausalLM, AutoTokenizer

                        model = AutoModelForCausalLM.from_pretrained(
                            export_dir, dtype=torch.float16, device_map=str(device)
                        )
                        tokenizer = AutoTokenizer.from_pretrained(export_dir)
                    else:
                        model, tokenizer = load(
                            str(folders[method]), device, torch.float16 if device.type == "cuda" else torch.float32
                        )
                if text_prompt is None:
                    ids = tokenizer(read_eval_text("wikitext2")[:20000], return_tensors="pt").input_ids
                    text_prompt = ids[:, :prompt_tokens]
                prompt = text_prompt
            else:
                model, tokenizer = llama7b_shaped(LLAMA7B_ROWS[row], device, args.smoke), None
                prompt = torch.randint(
                    0, model.config.vocab_size, (1, prompt_tokens), generator=torch.Generator().manual_seed(0)
                )
            _no_stop(model)
            entry["results"] = []
            for batch in batches:
                entry["results"].append(measure(model, tokenizer, prompt, batch, new_tokens, backend))
                print(row, entry["results"][-1], flush=True)
            del model
        except Exception as err:  # noqa: BLE001  one failing row must not lose the others
            entry["error"] = f"{type(err).__name__}: {err}"
            traceback.print_exc()
        entry["seconds"] = round(time.perf_counter() - t, 1)
        out["rows"][row] = entry
        _free()
        write()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
