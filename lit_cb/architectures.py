"""Where things are in each supported model family: the one place lit_cb learns a model's layout.

Block-wise compression needs to know, for a causal LM, where its decoder blocks are, which
linears a block holds and in what order they run (true-sequential compression re-collects the
Hessians after each group of linears that read the same input), which norms block fine-tuning
trains, which modules outside the blocks produce block 0's inputs, what the default compression
and LoRA targets are, and which embeddings are tied. Hugging Face models do not say this in a
uniform way (``model.layers``, ``gpt_neox.layers``, ``model.decoder.layers``; fused ``qkv_proj``
in Phi-3), so each family gets one :class:`ArchitectureSpec` entry in :data:`FAMILIES`, keyed by
the ``model_type`` of its ``config.json``. Adding a family is one entry here plus a test in
``tests/test_families.py``.

An unsupported model is refused before any work (:func:`check_model`, called first thing by
``lit_cb.pipeline.run``), with the list of supported families.

This module imports neither torch nor transformers, so config validation can use it cheaply.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The Llama layout's compression and LoRA targets. They are also the config defaults, and a
# default config means "the family's own targets" (see ArchitectureSpec.compression_targets).
DEFAULT_TARGETS = r"(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$"
DEFAULT_LORA_TARGETS = r"layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$"

_LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
_LLAMA_NORMS = ("input_layernorm", "post_attention_layernorm")


def _alternation(names: tuple[str, ...]) -> str:
    return "|".join(re.escape(n) for n in names)


@dataclass(frozen=True)
class ArchitectureSpec:
    """The layout of one model family (module names are relative to the ``*ForCausalLM``)."""

    family: str
    """Name used in configs (``model.architecture``) and messages; also its main ``model_type``."""
    model_types: tuple[str, ...]
    """``config.json`` ``model_type`` values of this family."""
    layers: str
    """The ``nn.ModuleList`` of decoder blocks."""
    groups: tuple[tuple[str, ...], ...]
    """The linears of a block (names inside the block) in execution order, grouped by shared
    input: a group is compressed together from one Hessian, then the next group's Hessian is
    collected through the compressed ones (true-sequential)."""
    norms: tuple[str, ...]
    """The norm modules inside a block; block fine-tuning trains their weights."""
    input_modules: tuple[str, ...]
    """Modules outside the blocks that compute block 0's inputs and keyword arguments
    (embeddings, positional embeddings, rotary tables): they go to the working device while the
    inputs are captured. Names missing from a particular model (e.g. OPT's ``project_in`` when
    the embedding width equals the hidden size) are skipped."""
    embeddings: str
    """The input token embedding (``lm_head`` shares its weight when the config ties them)."""
    lm_head: str = "lm_head"
    example: str = ""
    """A 7B-class checkpoint of the family, for the README and recipe configs."""
    config: str = ""
    """The config under ``configs/`` to start from."""
    targets: str = ""
    """Default compression targets (regex over names inside a block); empty: every block linear."""
    lora_targets: str = ""
    """Default LoRA targets (regex over full module names); empty: every block linear."""
    notes: str = ""

    @property
    def linears(self) -> tuple[str, ...]:
        """Every linear of a block, in execution order."""
        return tuple(name for group in self.groups for name in group)

    @property
    def default_targets(self) -> str:
        return self.targets or f"({_alternation(self.linears)})$"

    @property
    def default_lora_targets(self) -> str:
        return self.lora_targets or rf"layers\.\d+\.({_alternation(self.linears)})$"

    def compression_targets(self, requested: str) -> str:
        """The regex to compress with: the family's default when the config keeps the default
        (Llama's names mean nothing in a Phi-3 or GPT-NeoX block), else the user's own."""
        return self.default_targets if requested == DEFAULT_TARGETS else requested

    def lora_target_regex(self, requested: str) -> str:
        """Same for LoRA targets."""
        return self.default_lora_targets if requested == DEFAULT_LORA_TARGETS else requested

    def block_prefix(self, index: int) -> str:
        """Full-name prefix of block ``index`` (``"model.layers.3."``)."""
        return f"{self.layers}.{index}."

    def tied(self, config: Any) -> bool:
        """Whether ``lm_head`` shares the input embedding's weight under this HF config."""
        return bool(getattr(config, "tie_word_embeddings", False))

    def decoder_layers(self, model: Any):
        """The model's decoder blocks (an ``nn.ModuleList``)."""
        from torch import nn

        try:
            layers = model.get_submodule(self.layers)
        except AttributeError as err:
            raise TypeError(f"{type(model).__name__} ({self.family}) has no `{self.layers}`: {err}") from err
        if not isinstance(layers, nn.ModuleList):
            raise TypeError(f"{type(model).__name__}.{self.layers} is a {type(layers).__name__}, not a ModuleList")
        return layers

    def present_input_modules(self, model: Any) -> list:
        """The :attr:`input_modules` this model has."""
        found = []
        for name in self.input_modules:
            try:
                found.append(model.get_submodule(name))
            except AttributeError:
                continue
        return found


_LLAMA_LIKE = dict(
    groups=_LLAMA_GROUPS,
    norms=_LLAMA_NORMS,
    input_modules=("model.embed_tokens", "model.rotary_emb"),
    layers="model.layers",
    embeddings="model.embed_tokens",
    targets=DEFAULT_TARGETS,
    lora_targets=DEFAULT_LORA_TARGETS,
)

FAMILIES: dict[str, ArchitectureSpec] = {
    spec.family: spec
    for spec in (
        ArchitectureSpec(
            family="llama",
            model_types=("llama",),
            example="meta-llama/Llama-2-7b-hf (also Vicuna, SmolLM2)",
            config="llama7b_codebook.yaml",
            **_LLAMA_LIKE,
        ),
        ArchitectureSpec(
            family="mistral",
            model_types=("mistral",),
            example="mistralai/Mistral-7B-v0.1",
            config="mistral7b_codebook.yaml",
            notes="sliding-window attention in every layer (one mask for all blocks)",
            **_LLAMA_LIKE,
        ),
        ArchitectureSpec(
            family="qwen2",
            model_types=("qwen2",),
            example="Qwen/Qwen2-7B",
            config="qwen2_7b_aqlm.yaml",
            notes="q/k/v linears have biases",
            **_LLAMA_LIKE,
        ),
        ArchitectureSpec(
            family="qwen3",
            model_types=("qwen3",),
            example="Qwen/Qwen3-8B",
            config="qwen3_8b_codebook.yaml",
            notes="per-head q_norm/k_norm inside attention (trained by block fine-tuning)",
            **{**_LLAMA_LIKE, "norms": (*_LLAMA_NORMS, "self_attn.q_norm", "self_attn.k_norm")},
        ),
        ArchitectureSpec(
            family="gemma",
            model_types=("gemma",),
            example="google/gemma-7b",
            config="gemma_7b_codebook.yaml",
            notes="tied embeddings, GELU MLP",
            **_LLAMA_LIKE,
        ),
        ArchitectureSpec(
            family="gemma2",
            model_types=("gemma2",),
            example="google/gemma-2-9b",
            config="gemma2_9b_codebook.yaml",
            notes="alternating sliding/full attention: calibration windows must not exceed sliding_window",
            **{
                **_LLAMA_LIKE,
                "norms": (*_LLAMA_NORMS, "pre_feedforward_layernorm", "post_feedforward_layernorm"),
            },
        ),
        ArchitectureSpec(
            family="phi3",
            model_types=("phi3",),
            layers="model.layers",
            groups=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
            norms=_LLAMA_NORMS,
            input_modules=("model.embed_tokens", "model.rotary_emb"),
            embeddings="model.embed_tokens",
            example="microsoft/Phi-3-mini-4k-instruct",
            config="phi3_mini_codebook.yaml",
            notes="fused qkv_proj and gate_up_proj are compressed as one linear each",
        ),
        ArchitectureSpec(
            family="gpt_neox",
            model_types=("gpt_neox",),
            layers="gpt_neox.layers",
            groups=(
                ("attention.query_key_value",),
                ("attention.dense",),
                ("mlp.dense_h_to_4h",),
                ("mlp.dense_4h_to_h",),
            ),
            norms=("input_layernorm", "post_attention_layernorm"),
            input_modules=("gpt_neox.embed_in", "gpt_neox.rotary_emb"),
            embeddings="gpt_neox.embed_in",
            example="EleutherAI/pythia-6.9b",
            config="pythia_6_9b_codebook.yaml",
            notes="fused query_key_value; parallel attention + MLP residual; LayerNorm with biases",
        ),
        ArchitectureSpec(
            family="opt",
            model_types=("opt",),
            layers="model.decoder.layers",
            groups=(
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                ("self_attn.out_proj",),
                ("fc1",),
                ("fc2",),
            ),
            norms=("self_attn_layer_norm", "final_layer_norm"),
            input_modules=("model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in"),
            embeddings="model.decoder.embed_tokens",
            example="facebook/opt-6.7b",
            config="opt_6_7b_codebook.yaml",
            notes="learned positional embeddings, ReLU MLP, linears with biases, tied embeddings",
        ),
    )
}

# Known model types that are refused with a reason (beyond "not in the list").
UNSUPPORTED_REASONS = {
    "gpt2": (
        "GPT-2 stores its projections as transformers Conv1D (weight [in, out]), not nn.Linear, "
        "and lit_cb compresses nn.Linear layers only"
    ),
    "mixtral": "mixture-of-experts blocks are not supported",
    "qwen2_moe": "mixture-of-experts blocks are not supported",
    "qwen3_moe": "mixture-of-experts blocks are not supported",
}

_BY_MODEL_TYPE = {t: spec for spec in FAMILIES.values() for t in spec.model_types}


def supported() -> str:
    """The supported families, for messages."""
    return ", ".join(FAMILIES)


def _model_type(obj: Any) -> str | None:
    if isinstance(obj, str):
        return obj
    if isinstance(obj, dict):
        return obj.get("model_type")
    config = getattr(obj, "config", obj)  # a model, or a config
    return getattr(config, "model_type", None)


def spec_for(model_or_config: Any) -> ArchitectureSpec:
    """The spec of a model, a Hugging Face config, a ``config.json`` dict, or a family /
    ``model_type`` name; ValueError naming the supported families otherwise."""
    model_type = _model_type(model_or_config)
    spec = _BY_MODEL_TYPE.get(model_type) if model_type else None
    if spec is not None:
        return spec
    what = f"model_type {model_type!r}" if model_type else f"{type(model_or_config).__name__} (no Hugging Face config)"
    reason = UNSUPPORTED_REASONS.get(model_type or "")
    raise ValueError(
        f"unsupported architecture: {what}{f' ({reason})' if reason else ''}; lit_cb supports: {supported()} "
        "(add a family in lit_cb/architectures.py)"
    )


def check_attention_uniform(config: Any, seqlen: int) -> None:
    """Blocks are calibrated with the keyword arguments (attention mask included) captured at
    block 0. Families that alternate sliding-window and full attention (Gemma2, Qwen2 with
    ``use_sliding_window``) give every block the same mask only while windows fit in the sliding
    window: refuse longer calibration windows rather than calibrate later blocks with a wrong mask."""
    layer_types = getattr(config, "layer_types", None) or []
    window = getattr(config, "sliding_window", None)
    if len(set(layer_types)) > 1 and window and seqlen > window:
        raise ValueError(
            f"{getattr(config, 'model_type', 'this model')} mixes {sorted(set(layer_types))} layers with "
            f"sliding_window={window}; calibration windows of {seqlen} tokens would need per-block masks. "
            f"Set data.calibration_seqlen <= {window}"
        )


def _read_config(name_or_path: str) -> Any:
    """The model's Hugging Face config (or its raw ``config.json`` when transformers does not know
    the model type), without loading weights; None when it cannot be read."""
    path = Path(name_or_path).expanduser()
    local = path.is_dir()
    if not local and name_or_path.startswith((".", "/", "~")):
        return None  # a local path that does not exist: loading reports it
    if local and not (path / "config.json").is_file():
        return None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_path)
    except ValueError:
        # A model type transformers does not know: its raw model_type still names it.
        return json.loads((path / "config.json").read_text()) if local else None
    except OSError:
        return None  # an unreachable hub id: loading reports it


def check_model(
    name_or_path: str,
    declared: str | None = None,
    embedded: dict[str, str] | None = None,
    calibration_seqlen: int | None = None,
) -> ArchitectureSpec | None:
    """Refuse an unsupported model before any work, from its config alone (no weights loaded).

    ``declared`` is ``model.architecture`` from the run config: it must name a family, and match
    the weights when their config is readable. ``embedded`` maps embedded model names to their
    family. With ``calibration_seqlen``, also :func:`check_attention_uniform`. Returns the spec,
    or None when neither the config nor a declaration says what the model is (a hub id that
    cannot be reached: loading it fails next, with its own message).
    """
    declared_spec = spec_for(declared) if declared else None
    if embedded and name_or_path in embedded:
        config: Any = embedded[name_or_path]
    else:
        config = _read_config(name_or_path)
    if config is None:
        return declared_spec
    spec = spec_for(config)
    if declared_spec is not None and declared_spec is not spec:
        raise ValueError(
            f"model.architecture={declared!r} but {name_or_path} holds a {_model_type(config)!r} model "
            f"({spec.family}); fix model.architecture or model.name"
        )
    if calibration_seqlen is not None and not isinstance(config, str | dict):
        check_attention_uniform(config, calibration_seqlen)
    return spec


__all__ = [
    "DEFAULT_LORA_TARGETS",
    "DEFAULT_TARGETS",
    "FAMILIES",
    "ArchitectureSpec",
    "check_attention_uniform",
    "check_model",
    "spec_for",
    "supported",
]
