"""README.md for a saved model folder: what the model is, its bits and perplexities, how to load it.

Model hubs show a folder's README.md as its card (the YAML front matter becomes the model's metadata),
and a person handed the folder reads it first. lit_cb writes one into every model folder it saves
(:func:`lit_cb_card`) and into every AQLM export (:func:`aqlm_card`), built only from what the folder
itself holds (config.json's quantization_config, the safetensors headers, compression.json), so the
card cannot disagree with the files. It is written before ``manifest.json``, which then covers it.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

CARD = "README.md"
PPL_STAGES = ("float", "compressed", "recovered")


def _front_matter(tags: list[str], base_model: str | None) -> str:
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:"]
    lines += [f"- {t}" for t in tags]
    if base_model:
        lines.append(f"base_model: {base_model}")
    return "\n".join(lines + ["---", ""])


def _layer_formats(modules: dict) -> str:
    """``"210 x CodebookLinear 1x8 g4 (rank-2 low-rank slot: 210)"``-style summary of the module specs."""
    kinds: Counter = Counter()
    ranks: Counter = Counter()
    for spec in modules.values():
        kind = spec.get("type")
        if kind == "CodebookLinear":
            f = spec["format"]
            og = f" og{f['out_group_size']}" if f.get("out_group_size", 1) != 1 else ""
            kinds[f"CodebookLinear {f['num_codebooks']}x{f['nbits_per_codebook']} g{f['in_group_size']}{og}"] += 1
        elif kind == "TrellisLinear":
            f = spec["format"]
            walk = f"L{f['state_bits']} k{f['bits_per_step']} tiles {f['tile_rows']}x{f['tile_cols']}"
            kinds[f"TrellisLinear {walk}"] += 1
        else:
            kinds[str(kind or "unknown")] += 1
        if spec.get("low_rank"):
            ranks[(spec["low_rank"], spec.get("low_rank_bits", 16))] += 1
    text = ", ".join(f"{n} x {kind}" for kind, n in kinds.most_common())
    if ranks:
        slots = ", ".join(f"rank {r} in {bits} bits: {n}" for (r, bits), n in sorted(ranks.items()))
        text += f"; low-rank slots holding merged LoRA adapters ({slots})"
    return text


def _base_model(run_config: dict) -> str | None:
    """The hub id the model came from, when the run named one (not a local folder or an embedded name)."""
    from lit_cb.models import EMBEDDED_HUB_IDS

    name = (run_config.get("model") or {}).get("name")
    if name in EMBEDDED_HUB_IDS:
        return EMBEDDED_HUB_IDS[name]
    if isinstance(name, str) and name.count("/") == 1 and not Path(name).exists() and not name.startswith("."):
        return name
    return None


def lit_cb_card(folder: str | Path, extra: dict | None = None) -> str:
    """The card of a lit_cb model folder whose config.json and safetensors are written already."""
    from lit_cb.serialization import bits_per_weight_on_disk, read_quantization_config

    folder = Path(folder)
    extra = extra or {}
    run_config = extra.get("run_config") or {}
    modules = (read_quantization_config(folder) or {}).get("modules") or {}
    model_type = json.loads((folder / "config.json").read_text()).get("model_type", "causal LM")
    method = (run_config.get("compression") or {}).get("method")
    title = run_config.get("run_name") or folder.name
    lines = [
        _front_matter(["lit_cb", "quantized", *([method] if method else [])], _base_model(run_config)),
        f"# {title}",
        "",
        f"A {model_type} model whose linear layers lit_cb compressed"
        + (f" with `{method}`" if method else "")
        + f": {_layer_formats(modules) or 'no compressed layer'}.",
        "",
    ]
    if modules:
        bits = bits_per_weight_on_disk(folder)
        lines += [
            f"Bits per weight, measured from the saved tensors: **{bits['compressed_linears']:.3f}** over the "
            f"compressed linears (codes, codebooks, scales, low-rank slots), {bits['whole_model']:.3f} over the "
            "whole model (embeddings, head and norms as saved).",
            "",
        ]
    ppl = extra.get("wikitext2_ppl") or {}
    shown = [s for s in PPL_STAGES if isinstance(ppl.get(s), int | float)]
    if shown:
        data = run_config.get("data") or {}
        seqlen, windows = data.get("eval_seqlen"), data.get("max_eval_windows")
        protocol = f"windows of {seqlen} tokens" if seqlen else "lit_cb's protocol"
        protocol += f", the first {windows}" if windows else ", all of them"
        lines += [
            f"WikiText-2 test perplexity ({protocol}), as the saving run measured it:",
            "",
            "| " + " | ".join(shown) + " |",
            "| " + " | ".join("---:" for _ in shown) + " |",
            "| " + " | ".join(f"{ppl[s]:.2f}" for s in shown) + " |",
            "",
        ]
    lines += [
        "## Use",
        "",
        "```python",
        'import lit_cb  # registers quant_method "lit_cb" with transformers',
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{folder.name}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{folder.name}")',
        "```",
        "",
        "```bash",
        f"lit_cb chat {folder.name}                       # or: lit_cb generate {folder.name} --prompt ...",
        f"lit_cb evaluate {folder.name}                   # WikiText-2 perplexity, by the saving run's protocol",
        f"lit_cb export {folder.name} --format aqlm --out {folder.name}-aqlm   # for stock transformers + aqlm",
        "```",
        "",
        "`compression.json` holds the whole run config; `manifest.json` the sha256 of every file and tensor,",
        "which `lit_cb.serialization.load_compressed` verifies.",
        "",
    ]
    return "\n".join(lines)


def aqlm_card(folder: str | Path, quant: dict, adapter_layers: list[str]) -> str:
    """The card of an AQLM folder that :func:`lit_cb.interop.aqlm.save_aqlm` wrote."""
    folder = Path(folder)
    fmt = f"{quant['num_codebooks']}x{quant['nbits_per_codebook']} g{quant['in_group_size']}"
    lines = [
        _front_matter(["aqlm", "quantized", "lit_cb"], None),
        f"# {folder.name}",
        "",
        f"An AQLM model ({fmt}, out group {quant['out_group_size']}), exported by lit_cb: stock transformers "
        "loads it with the `aqlm` package.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{folder.name}")',
    ]
    if adapter_layers:
        lines += [
            "from peft import PeftModel",
            "",
            f'model = PeftModel.from_pretrained(model, "{folder.name}/lora")  # part of the model: see below',
        ]
    lines += ["```", ""]
    if adapter_layers:
        lines += [
            f"`lora/` is part of the model: the low-rank corrections of {len(adapter_layers)} compressed layers "
            "(merged LoRA adapters), which AQLM's layer cannot hold, as a peft LoRA adapter. Without it the "
            "model is not the one that was evaluated.",
            "",
        ]
    return "\n".join(lines)


def write_card(folder: str | Path, text: str) -> Path:
    path = Path(folder) / CARD
    path.write_text(text)
    return path
