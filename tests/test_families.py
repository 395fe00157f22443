"""Every supported model family end to end on a tiny random model built from its own transformers
config class: layout map, Hessians and true-sequential groups, both methods, block fine-tuning,
LoRA recovery through the dispatcher in a real Lightning Trainer, save/load, generation with the
KV cache, kernel dispatch."""

from __future__ import annotations

import json
import lzma
import re
from pathlib import Path

import lightning as L
import pytest
import torch
import transformers
from torch import nn
from torch.utils.data import DataLoader

from lit_cb.architectures import DEFAULT_LORA_TARGETS, DEFAULT_TARGETS, FAMILIES, check_model, spec_for
from lit_cb.block_finetune import BlockFinetuneConfig, trainable_parameters
from lit_cb.callbacks import CompressionCallback
from lit_cb.cli import load_recipe, main
from lit_cb.compress import CompressionConfig, bits_per_weight, capture_block_inputs, compress_model, run_block
from lit_cb.config import RunConfig, load_config
from lit_cb.hessian import attach_hessian_hooks, remove_hooks
from lit_cb.kernels import dispatch
from lit_cb.layers import CodebookLinear
from lit_cb.models import EMBEDDED_FAMILIES, decoder_layers
from lit_cb.recovery import RecoveryConfig, RecoveryModule, lora_target_names
from lit_cb.serialization import load_compressed, save_compressed

ROOT = Path(__file__).resolve().parents[1]
SEQ = 32
TOKEN_IDS = dict(bos_token_id=1, eos_token_id=1, pad_token_id=1)  # the tiny tokenizer's <eos>


def _llama_style(cls_name: str, **extra):
    def make(vocab: int):
        cls = getattr(transformers, cls_name)
        return cls(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **TOKEN_IDS,
            **extra,
        )

    return make


# One tiny config per family, from the family's own config class.
TINY = {
    "llama": _llama_style("LlamaConfig"),
    "mistral": _llama_style("MistralConfig", sliding_window=SEQ),
    "qwen2": _llama_style("Qwen2Config"),
    "qwen3": _llama_style("Qwen3Config", head_dim=16),
    "gemma": _llama_style("GemmaConfig", head_dim=16),
    "gemma2": _llama_style("Gemma2Config", head_dim=16, sliding_window=SEQ),
    "phi3": _llama_style("Phi3Config"),
    "gpt_neox": lambda vocab: transformers.GPTNeoXConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        **TOKEN_IDS,
    ),
    "opt": lambda vocab: transformers.OPTConfig(
        vocab_size=vocab,
        hidden_size=64,
        ffn_dim=128,
        word_embed_proj_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        **TOKEN_IDS,
    ),
}

# The 7B-class checkpoint of each family whose layer shapes the kernels must accept (dims from the
# published config.json files; the model is built on the meta device, one block only).
SEVEN_B = {
    "llama": ("LlamaConfig", dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32)),
    "mistral": (
        "MistralConfig",
        dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8),
    ),
    "qwen2": (
        "Qwen2Config",
        dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4),
    ),
    "qwen3": (
        "Qwen3Config",
        dict(hidden_size=4096, intermediate_size=12288, num_attention_heads=32, num_key_value_heads=8, head_dim=128),
    ),
    "gemma": (
        "GemmaConfig",
        dict(hidden_size=3072, intermediate_size=24576, num_attention_heads=16, num_key_value_heads=16, head_dim=256),
    ),
    "gemma2": (
        "Gemma2Config",
        dict(hidden_size=3584, intermediate_size=14336, num_attention_heads=16, num_key_value_heads=8, head_dim=256),
    ),
    "phi3": ("Phi3Config", dict(hidden_size=3072, intermediate_size=8192, num_attention_heads=32, pad_token_id=0)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=4096, intermediate_size=16384, num_attention_heads=32)),
    "opt": ("OPTConfig", dict(hidden_size=4096, ffn_dim=16384, num_attention_heads=32, word_embed_proj_dim=4096)),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: with two threads on a shared 2-core machine, thread hand-offs cost 10-25x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_every_family_is_tested():
    assert set(TINY) == set(FAMILIES) == set(SEVEN_B)


def tiny_model(family: str, vocab: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(TINY[family](vocab))
    return model.eval()


@pytest.fixture(scope="module")
def windows(tiny_tokenizer) -> torch.Tensor:
    """16 windows of SEQ tokens of real C4 text under the shared tiny tokenizer."""
    from lit_cb.data.texts import embedded_text_path

    ids: list[int] = []
    with lzma.open(embedded_text_path("c4"), "rt", encoding="utf-8") as f:
        for line in f:
            ids += tiny_tokenizer(json.loads(line)["text"])["input_ids"]
            if len(ids) >= 16 * SEQ:
                break
    return torch.tensor(ids[: 16 * SEQ]).view(16, SEQ)


def _block_linears(block: nn.Module) -> set[str]:
    return {n for n, m in block.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_map_matches_the_model(family, windows, tiny_tokenizer):
    """The spec's blocks, linears, true-sequential groups, norms, input modules, targets and ties
    are what the transformers model really has and does."""
    model = tiny_model(family, len(tiny_tokenizer))
    spec = spec_for(model)
    assert spec is FAMILIES[family] and spec_for(model.config) is spec and spec_for(family) is spec
    layers = decoder_layers(model)
    assert len(layers) == 2 and layers is model.get_submodule(spec.layers)
    block = layers[0]
    assert _block_linears(block) == set(spec.linears)
    assert len(spec.linears) == len(set(spec.linears))

    # The default compression targets are every block linear; the LoRA ones every block linear of
    # every block (and nothing outside the blocks, e.g. lm_head).
    regex = re.compile(spec.compression_targets(DEFAULT_TARGETS))
    assert {n for n in _block_linears(block) if regex.search(n)} == set(spec.linears)
    lora = set(lora_target_names(model, RecoveryConfig()))
    assert lora == {f"{spec.block_prefix(i)}{n}" for i in range(2) for n in spec.linears}

    # Norms block fine-tuning trains = the spec's norms.
    trained = {n for n, _ in trainable_parameters(block, BlockFinetuneConfig(train_norms=True))}
    assert {n.rsplit(".", 1)[0] for n in trained} == set(spec.norms)

    # Groups: linears that the Hessian hooks find reading one input tensor, in call order.
    inputs, kwargs = capture_block_inputs(model, windows[:2], torch.device("cpu"), torch.device("cpu"))
    linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    accs, handles = attach_hessian_hooks(linears, torch.float32)
    try:
        run_block(block, inputs, kwargs, 2, torch.device("cpu"))
    finally:
        remove_hooks(handles)
    groups: list[list[str]] = []
    owner: dict[int, list[str]] = {}
    for name, acc in accs.items():  # insertion order = first call order
        if id(acc) not in owner:
            owner[id(acc)] = []
            groups.append(owner[id(acc)])
        owner[id(acc)].append(name)
    assert [set(g) for g in groups] == [set(g) for g in spec.groups]

    # The captured block-0 inputs and kwargs drive every block as the model does: chaining the
    # blocks reproduces the last block's output inside a normal forward.
    seen = {}
    handle = layers[-1].register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    with torch.no_grad():
        model(input_ids=windows[:2], use_cache=False)
    handle.remove()
    reference = seen["out"][0] if isinstance(seen["out"], tuple) else seen["out"]
    hidden = inputs
    for b in layers:
        hidden = run_block(b, hidden, kwargs, 2, torch.device("cpu"))
    torch.testing.assert_close(hidden, reference, rtol=1e-5, atol=1e-5)

    # Tied embeddings as the spec says.
    tied = model.get_submodule(spec.lm_head).weight is model.get_submodule(spec.embeddings).weight
    assert tied == spec.tied(model.config)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_input_modules_are_all_block_zero_needs(family, windows, tiny_tokenizer):
    """With every module except the spec's input modules on the meta device, block 0's inputs
    and kwargs still come out on the CPU and equal: the device move in compress_model is enough."""
    reference_model = tiny_model(family, len(tiny_tokenizer))
    expected, expected_kwargs = capture_block_inputs(
        reference_model, windows[:2], torch.device("cpu"), torch.device("cpu")
    )
    spec = spec_for(reference_model)
    model = tiny_model(family, len(tiny_tokenizer))
    keep = {id(m) for m in spec.present_input_modules(model)}
    assert keep, family
    for m in model.modules():
        if id(m) not in keep and not any(id(p) in keep for p in m.modules()):
            for name, p in list(m.named_parameters(recurse=False)):
                setattr(m, name, nn.Parameter(p.to("meta"), requires_grad=False))
            for name, b in list(m.named_buffers(recurse=False)):
                m.register_buffer(name, b.to("meta"))
    got, got_kwargs = capture_block_inputs(model, windows[:2], torch.device("cpu"), torch.device("cpu"))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert got_kwargs.keys() == expected_kwargs.keys()
    for key, value in got_kwargs.items():
        for a, b in zip(
            value if isinstance(value, tuple) else (value,),
            expected_kwargs[key] if isinstance(value, tuple) else (expected_kwargs[key],),
            strict=True,
        ):
            if isinstance(a, torch.Tensor):
                assert a.device.type == "cpu", key
                torch.testing.assert_close(a, b, rtol=0, atol=0)


class _Windows(L.LightningDataModule):
    """Calibration windows for the CompressionCallback and training batches for recovery."""

    def __init__(self, ids: torch.Tensor) -> None:
        super().__init__()
        self.ids = ids

    def calibration_windows(self, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        return self.ids[rank::world_size]

    def train_dataloader(self) -> DataLoader:
        return DataLoader([{"input_ids": w} for w in self.ids], batch_size=4)


METHODS = {
    "codebook": {"in_group_size": 4, "nbits": 4, "kmeans_iters": 3},
    "aqlm": {
        "num_codebooks": 1,
        "nbits_per_codebook": 4,
        "in_group_size": 4,
        "beam_size": 2,
        "max_epochs": 2,
        "codebook_steps": 5,
        "init_kmeans_iters": 3,
    },
}
END_TO_END = [(f, "codebook") for f in sorted(FAMILIES)] + [("qwen2", "aqlm")]


@pytest.mark.parametrize("family,method", END_TO_END)
def test_family_end_to_end(family, method, windows, tiny_tokenizer, tmp_path):
    """Compression (+ 1 block fine-tuning epoch), 3 LoRA steps in a Lightning Trainer (dense LoRA
    on the one kept-dense linear, dispatcher LoRA on compressed ones), merge, save, reload with the
    same logits, bits/weight over exactly the family's block linears."""
    torch.manual_seed(0)
    model = tiny_model(family, len(tiny_tokenizer))
    spec = spec_for(model)
    config = CompressionConfig(
        method=method,
        method_config=METHODS[method],
        keep_dense=1,
        forward_batch_size=8,
        block_finetune={"epochs": 1, "batch_size": 4, "lr": 1e-3},
    )
    callback = CompressionCallback(config)
    module = RecoveryModule(
        model,
        RecoveryConfig(max_steps=3, lr=1e-2, warmup_steps=1, lora_r=4, lora_alpha=8, lora_on_compressed=True),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=3,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=_Windows(windows[:8]))
    assert trainer.global_step == 3

    # Every block linear of the family was compressed, except the one kept dense.
    report = callback.report
    all_linears = {f"{spec.block_prefix(i)}{n}" for i in range(2) for n in spec.linears}
    assert len(report.kept_dense) == 1 and set(report.kept_dense) < all_linears
    assert {r.name for r in report.layers} == all_linears - set(report.kept_dense)
    assert all(r.relative_error < 1.0 for r in report.layers)
    # Block fine-tuning ran on both blocks and trained the family's norms with the codebooks.
    assert [ft["block"] for ft in report.block_finetune] == [0, 1]
    for ft in report.block_finetune:
        norms = {n.rsplit(".", 1)[0] for n in ft["trainable"] if not n.endswith(("codebooks", "scales"))}
        assert norms == set(spec.norms)

    # LoRA trained on both kinds of linears (lora_B starts at zero).
    peft_model = module.model
    wrapped = {n for n, m in peft_model.named_modules() if hasattr(m, "lora_B") and len(m.lora_B)}
    assert len(wrapped) == len(all_linears)
    assert all(
        float(m.lora_B["default"].weight.detach().abs().sum()) > 0
        for n, m in peft_model.named_modules()
        if n in wrapped
    )
    ids = windows[8:10]
    peft_model.eval()  # OPT has dropout
    with torch.no_grad():
        adapted = peft_model(input_ids=ids, use_cache=False).logits
    merged = module.merged_model().eval()
    with torch.no_grad():
        merged_logits = merged(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(merged_logits, adapted, rtol=2e-2, atol=2e-2)
    compressed = {n: m for n, m in merged.named_modules() if isinstance(m, CodebookLinear)}
    assert set(compressed) == all_linears - set(report.kept_dense)
    assert all(m.rank == 4 for m in compressed.values())  # the merged adapter's low-rank slot

    # Save, reload, same logits; tied weights stay tied.
    out = save_compressed(merged, tmp_path / "model", tiny_tokenizer)
    loaded, tokenizer, meta = load_compressed(out)
    assert tokenizer is not None and set(meta["modules"]) == set(compressed)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, use_cache=False).logits, merged_logits, rtol=0, atol=0)
    # Greedy generation with the KV cache = argmax of full forwards without it.
    prompt, tokens = ids[:1, :6], ids[:1, :6]
    with torch.no_grad():
        generated = loaded.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=True)
        for _ in range(4):
            nxt = loaded(input_ids=tokens, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
    assert torch.equal(generated, tokens)
    if spec.tied(loaded.config):
        assert loaded.get_submodule(spec.lm_head).weight is loaded.get_submodule(spec.embeddings).weight

    # Bits/weight over exactly the compressed linears: independent count of their weights.
    bits = bits_per_weight(loaded)
    assert bits["compressed_params"] == sum(m.in_features * m.out_features for m in compressed.values())
    assert 1.0 < bits["compressed_linears"] < 16.0 and bits["compressed_linears"] < bits["whole_model"]
    print(f"{family} {method}: {bits['compressed_linears']:.3f} bits/weight over the compressed linears")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_kernels_accept_the_family_7b_shapes(family):
    """Every block linear of the family's 7B-class model (built on the meta device from the real
    dims) has a Triton kernel in both default formats (codebook 1x8 g4, AQLM 2x8 g8)."""
    from lit_cb.layers import CodebookFormat

    cls_name, dims = SEVEN_B[family]
    cfg = getattr(transformers, cls_name)(num_hidden_layers=1, vocab_size=128, **dims)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    spec = spec_for(model)
    block = decoder_layers(model)[0]
    with dispatch.interpreter_on_cpu():
        for name in spec.linears:
            layer = block.get_submodule(name)
            assert isinstance(layer, nn.Linear)
            x = torch.empty(1, layer.in_features, dtype=torch.float16)
            for m, b, g in ((1, 8, 4), (2, 8, 8)):
                fmt = CodebookFormat(layer.in_features, layer.out_features, g, 1, m, b, layer.bias is not None)
                assert dispatch.select_kernel(fmt, x) is not None, (family, name, fmt)


def test_triton_kernels_run_a_compressed_phi3(windows, tiny_tokenizer):
    """The Triton kernels (interpreted on the CPU) reproduce the reference forward on every
    compressed linear of a Phi-3 (fused qkv_proj / gate_up_proj)."""
    model = tiny_model("phi3", len(tiny_tokenizer))
    compress_model(model, windows[:4], CompressionConfig(method_config=METHODS["codebook"]), progress=False)
    layers = [m for m in model.modules() if isinstance(m, CodebookLinear)]
    assert len(layers) == 8
    gen = torch.Generator().manual_seed(0)
    with dispatch.interpreter_on_cpu():
        for layer in layers:
            x = torch.randn(3, layer.in_features, generator=gen).half()
            kernel = dispatch.select_kernel(layer.fmt, x)
            assert kernel is not None
            y = kernel(x, layer.codes, layer.codebooks, layer.scales, layer.bias, layer.fmt)
            ref = nn.functional.linear(x.double(), layer.dequantize().double())
            assert float((y.double() - ref).norm() / ref.norm()) < 1e-2


def _config_family(path: Path) -> str:
    """The family a config's model resolves to; placeholder paths must declare model.architecture."""
    recipes = {p.stem: p for p in (ROOT / "recipes").glob("*.py")}
    owner = max((s for s in recipes if path.stem == s or path.stem.startswith(s + "_")), key=len)
    cfg = load_config(path, cls=getattr(load_recipe(recipes[owner]), "CONFIG_CLASS", RunConfig))
    name, declared = cfg.model.name, cfg.model.architecture
    if name not in EMBEDDED_FAMILIES and not (Path(name).expanduser() / "config.json").is_file():
        assert declared is not None, f"{path.name}: model.name {name!r} is a placeholder; set model.architecture"
    spec = check_model(name, declared, EMBEDDED_FAMILIES)
    assert spec is not None, path.name
    return spec.family


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_config_names_a_supported_architecture(path):
    assert _config_family(path) in FAMILIES


def test_every_family_has_its_recipe_and_config():
    for spec in FAMILIES.values():
        config = ROOT / "configs" / spec.config
        assert config.is_file(), spec.config
        assert _config_family(config) == spec.family
        assert (ROOT / "recipes" / f"{config.stem}.py").is_file()


def _save_tiny(model: nn.Module, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_gpt2_is_refused_before_any_work(tmp_path, tiny_tokenizer, capsys, monkeypatch):
    cfg = transformers.GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=64, n_layer=2, n_head=4, **TOKEN_IDS)
    model = transformers.GPT2LMHeadModel(cfg)
    with pytest.raises(ValueError, match=r"gpt2.*Conv1D.*llama, mistral"):
        spec_for(model)
    with pytest.raises(ValueError, match="unsupported architecture"):
        compress_model(
            model, torch.zeros(2, 8, dtype=torch.long), CompressionConfig(), resume_dir=tmp_path / "b", progress=False
        )
    assert not (tmp_path / "b").exists()
    folder = _save_tiny(model, tiny_tokenizer, tmp_path / "gpt2")

    def no_loading(*args, **kwargs):
        raise AssertionError("the weights were loaded before the architecture check")

    monkeypatch.setattr("lit_cb.pipeline.load_model", no_loading)
    out = tmp_path / "out"
    rc = main(["run", str(ROOT / "recipes" / "smollm2_codebook.py"), f"model.name={folder}", f"output_dir={out}"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "unsupported architecture: model_type 'gpt2'" in err and "Conv1D" in err
    assert all(f in err for f in FAMILIES)
    assert not out.exists()  # nothing written


def test_declared_architecture_must_match_the_weights(tmp_path, tiny_tokenizer):
    folder = _save_tiny(tiny_model("gpt_neox", len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "neox")
    assert check_model(str(folder)) is FAMILIES["gpt_neox"]
    assert check_model(str(folder), "gpt_neox") is FAMILIES["gpt_neox"]
    with pytest.raises(ValueError, match="model.architecture='llama' but .* holds a 'gpt_neox' model"):
        check_model(str(folder), "llama")
    with pytest.raises(ValueError, match=r"model.architecture='falcon'; allowed: \['gemma'"):
        load_config(None, ["model.architecture=falcon"])
    # A placeholder path is taken at its declaration; loading it fails later with its own message.
    assert check_model("/no/such/folder", "qwen3") is FAMILIES["qwen3"]
    assert check_model("smollm2", None, EMBEDDED_FAMILIES) is FAMILIES["llama"]


def test_mixed_sliding_window_longer_than_the_window_is_refused(tmp_path, tiny_tokenizer, windows):
    """Gemma2 alternates sliding and full attention; blocks are calibrated with block 0's mask, so
    windows longer than the sliding window are refused before any work (and allowed up to it)."""
    cfg = TINY["gemma2"](len(tiny_tokenizer))
    cfg.sliding_window = 8
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"sliding_window=8.*data.calibration_seqlen <= 8"):
        compress_model(model, windows[:2, :16], CompressionConfig(method_config=METHODS["codebook"]), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    folder = _save_tiny(model, tiny_tokenizer, tmp_path / "gemma2")
    with pytest.raises(ValueError, match="sliding_window=8"):
        check_model(str(folder), "gemma2", None, calibration_seqlen=16)
    assert check_model(str(folder), "gemma2", None, calibration_seqlen=8) is FAMILIES["gemma2"]


def test_default_lora_targets_resolve_per_family():
    assert FAMILIES["llama"].lora_target_regex(DEFAULT_LORA_TARGETS) == DEFAULT_LORA_TARGETS
    assert FAMILIES["llama"].compression_targets(DEFAULT_TARGETS) == DEFAULT_TARGETS
    custom = r"mlp\.fc1$"
    assert FAMILIES["opt"].compression_targets(custom) == custom
    assert FAMILIES["opt"].lora_target_regex(custom) == custom


def test_non_llama_recipe_runs_through_the_pipeline(tmp_path, tiny_tokenizer):
    """The GPT-NeoX recipe, on a tiny GPT-NeoX folder, through `lightning run` (CLI, datamodule,
    callback, recovery, evaluation, save): its model.architecture matches the weights."""
    folder = _save_tiny(tiny_model("gpt_neox", len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "neox")
    overrides = {
        "output_dir": tmp_path / "out",
        "model.name": folder,
        "model.dtype": "float32",
        "model.requires_gpu": False,
        "data.num_calibration_samples": 8,
        "data.calibration_seqlen": SEQ,
        "data.num_finetune_samples": 16,
        "data.finetune_seqlen": SEQ,
        "data.num_val_samples": 2,
        "data.eval_seqlen": 64,
        "data.max_eval_windows": 2,
        "data.batch_size": 4,
        "compression.method_config": "{in_group_size: 4, nbits: 4, kmeans_iters: 3}",
        "compression.keep_dense": 1,
        "recovery.max_steps": 2,
        "recovery.lora_r": 4,
        "trainer.accelerator": "cpu",
        "trainer.precision": "32-true",
        "trainer.deterministic": False,
    }
    recipe = ROOT / "recipes" / "pythia_6_9b_codebook.py"
    assert main(["run", str(recipe), *(f"{k}={v}" for k, v in overrides.items())]) == 0
    run_dir = tmp_path / "out" / "pythia_6_9b_codebook"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["wikitext2_ppl"]) == {"float", "compressed", "recovered"}
    (kept,) = metrics["compression_report"]["kept_dense"]
    assert kept.startswith("gpt_neox.layers.")
    _, _, meta = load_compressed(run_dir / "model")
    assert len(meta["modules"]) == 2 * len(FAMILIES["gpt_neox"].linears) - 1 and kept not in meta["modules"]
    assert all(name.startswith("gpt_neox.layers.") for name in meta["modules"])
