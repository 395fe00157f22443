"""AQLM export/import against the real ``aqlm`` package (1.1.7) and stock transformers, on CPU.

The exported folders are loaded by ``AutoModelForCausalLM.from_pretrained`` with aqlm's
``QuantizedLinear`` (its CPU paths: the numba LUT kernel for 2**8 codebooks, dequantize + matmul
otherwise) and must give lit_cb's logits. Tolerance: both sides run float32 on the same fp16
codebook values (fp16 -> fp32 is exact), so only the summation order differs (aqlm: per-group
lookup tables; lit_cb: dense weight then matmul): rtol 1e-4 / atol 1e-5 of the logit scale. lit_cb's
own fp16-storage path (weight rounded to fp16 before the matmul) is checked within 1e-2 of the
logit scale: a few fp16 roundings of every weight, through two blocks.

aqlm 1.1.7's numba kernel runs ``prange`` over input groups while every iteration adds into all
outputs (a data race, Vahe1994/AQLM issue #86): with 2 threads we measured logits off by 0.35
on a scale of 0.6. The tests therefore run it on one numba thread.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import aqlm
import numba
import pytest
import torch
from aqlm.utils import pack_int_data, unpack_int_data
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from lit_cb import export as export_cli
from lit_cb.interop.aqlm import AQLMFormatError, export_aqlm, import_aqlm, save_aqlm
from lit_cb.layers import CodebookFormat, CodebookLinear, unpack_codes
from lit_cb.serialization import load_compressed, save_compressed

from .conftest import tiny_llama

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(autouse=True)
def _one_numba_thread():
    """aqlm's CPU kernel races with more than one thread (see the module docstring)."""
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(before)


def _llama(bias: bool = False, tied: bool = True) -> LlamaForCausalLM:
    """tiny_llama with every linear 64 x 64 (intermediate 64, as many kv heads as heads): aqlm's
    numba kernel compiles once per (shape, M), ~5 s each on a loaded 2-core machine."""
    cfg = tiny_llama(intermediate=64).config
    cfg.num_key_value_heads = cfg.num_attention_heads
    cfg.attention_bias = cfg.mlp_bias = bias
    cfg.tie_word_embeddings = tied
    torch.manual_seed(1)
    return LlamaForCausalLM(cfg).eval()


def _random_layer(linear: nn.Linear, m: int, b: int, g: int, og: int, gen: torch.Generator) -> CodebookLinear:
    fmt = CodebookFormat(
        linear.in_features,
        linear.out_features,
        in_group_size=g,
        out_group_size=og,
        num_codebooks=m,
        nbits_per_codebook=b,
        bias=linear.bias is not None,
    )
    codes = torch.randint(0, 2**b, (fmt.num_out_groups, fmt.num_in_groups, m), generator=gen)
    codebooks = torch.randn(m, 2**b, og, g, generator=gen) * 0.1
    scales = torch.rand(fmt.num_out_groups, generator=gen) + 0.5
    bias = torch.randn(linear.out_features, generator=gen) * 0.1 if fmt.bias else None
    return CodebookLinear.from_tensors(fmt, codes, codebooks, scales, bias)


def _codebook_model(m: int, b: int, g: int = 8, og: int = 1, bias: bool = False, seed: int = 0) -> LlamaForCausalLM:
    """A tiny Llama whose decoder linears are CodebookLinears with random codes (fp16 storage)."""
    model = _llama(bias=bias)
    gen = torch.Generator().manual_seed(seed)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.endswith(TARGETS):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, _random_layer(module, m, b, g, og, gen))
    return model


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(seed))


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


FORMATS = {  # id: (M, B, g, og, bias)
    "1x8_g8": (1, 8, 8, 1, False),
    "2x8_g8_bias": (2, 8, 8, 1, True),
    "1x16_g8": (1, 16, 8, 1, False),
    "2x4_g4_og2": (2, 4, 4, 2, False),
}


@pytest.mark.parametrize("fmt_id", list(FORMATS))
def test_export_loads_in_transformers_with_aqlm_and_matches_lit_cb(tmp_path, tiny_tokenizer, fmt_id):
    m, b, g, og, bias = FORMATS[fmt_id]
    lit_dir, aqlm_dir = tmp_path / "lit", tmp_path / "aqlm"
    save_compressed(_codebook_model(m, b, g, og, bias), lit_dir, tiny_tokenizer)

    assert export_cli.main([str(lit_dir), "--format", "aqlm", "--out", str(aqlm_dir)]) == 0

    quant = json.loads((aqlm_dir / "config.json").read_text())["quantization_config"]
    assert quant == {
        "quant_method": "aqlm",
        "in_group_size": g,
        "out_group_size": og,
        "num_codebooks": m,
        "nbits_per_codebook": b,
        "linear_weights_not_to_quantize": ["lm_head.weight", "lm_head"],
    }
    lit, _, _ = load_compressed(lit_dir)
    tensors = load_file(str(aqlm_dir / "model.safetensors"))
    q = lit.model.layers[0].self_attn.q_proj
    codes = tensors["model.layers.0.self_attn.q_proj.codes"]
    assert codes.dtype == (torch.int8 if b <= 8 else torch.int16)
    assert list(codes.shape) == [64 // og, 64 // g, m]
    # aqlm's own unpacking gives lit_cb's code indices; aqlm's own packing gives the stored bytes.
    assert torch.equal(unpack_int_data(codes, b), unpack_codes(q.codes, b))
    assert torch.equal(pack_int_data(unpack_codes(q.codes, b).clone(), b), codes)
    assert tensors["model.layers.0.self_attn.q_proj.codebooks"].shape == (m, 2**b, og, g)
    assert tensors["model.layers.0.self_attn.q_proj.scales"].shape == (64 // og, 1, 1, 1)
    assert ("model.layers.0.self_attn.q_proj.bias" in tensors) == bias

    hf = AutoModelForCausalLM.from_pretrained(aqlm_dir, dtype=torch.float32)
    for name, module in hf.named_modules():
        if name.endswith(TARGETS):
            assert isinstance(module, aqlm.QuantizedLinear), name
    assert type(hf.lm_head) is nn.Linear
    ids = _ids()
    with torch.no_grad():
        hf_logits = hf(ids).logits
        lit_fp16_storage = lit(ids).logits
        # nn.Module.float: transformers refuses .float() on any model a quantizer loaded (lit_cb's too);
        # the cast itself is what this comparison needs (codebooks fp16 -> fp32 is exact).
        lit_fp32 = nn.Module.float(lit)(ids).logits
    scale = float(lit_fp32.abs().max())
    torch.testing.assert_close(hf_logits, lit_fp32, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(hf_logits, lit_fp16_storage, rtol=0, atol=1e-2 * scale)
    with torch.no_grad():  # one token takes aqlm's gemv branch
        torch.testing.assert_close(hf(ids[:1, :1]).logits, lit(ids[:1, :1]).logits, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("fmt_id", ["2x8_g8_bias", "1x16_g8"])
def test_import_gives_identical_tensors_and_reexport_round_trips(tmp_path, tiny_tokenizer, fmt_id):
    m, b, g, og, bias = FORMATS[fmt_id]
    lit_dir, aqlm_dir = tmp_path / "lit", tmp_path / "aqlm"
    original = _codebook_model(m, b, g, og, bias, seed=3)
    save_compressed(original, lit_dir, tiny_tokenizer)
    export_aqlm(lit_dir, aqlm_dir)

    model, tokenizer = import_aqlm(aqlm_dir)
    assert tokenizer is not None and tokenizer("the of").input_ids == tiny_tokenizer("the of").input_ids
    assert isinstance(model.model.layers[1].mlp.down_proj, CodebookLinear)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tying survives the import
    _assert_same_tensors(model.state_dict(), original.state_dict())  # codes back in lit_cb's storage

    save_aqlm(model, tmp_path / "again")
    _assert_same_tensors(
        load_file(str(tmp_path / "again" / "model.safetensors")), load_file(str(aqlm_dir / "model.safetensors"))
    )

    # the CLI path: AQLM folder -> lit_cb folder, loaded by lit_cb's own loader
    assert export_cli.main([str(aqlm_dir), "--format", "lit_cb", "--out", str(tmp_path / "back")]) == 0
    back, _, meta = load_compressed(tmp_path / "back")
    assert meta["source"]["format"] == "aqlm"
    _assert_same_tensors(back.state_dict(), original.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(back(_ids()).logits, original(_ids()).logits, rtol=0, atol=0)


def _published_style_folder(path, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """An AQLM folder written the way published checkpoints are, with aqlm's own packing and
    without lit_cb: float16, untied head, two safetensors shards + index, ``.weight`` names in
    linear_weights_not_to_quantize. Returns the tensors written."""
    model = _llama(tied=False).half()
    tensors = {}
    for key, t in model.state_dict().items():
        layer = key.removesuffix(".weight")
        if key.endswith(".weight") and layer.endswith(TARGETS):
            out_f, in_f = t.shape
            codes = torch.randint(0, 2**16, (out_f, in_f // 8, 1), generator=gen)
            tensors[f"{layer}.codes"] = pack_int_data(codes, 16)
            tensors[f"{layer}.codebooks"] = (torch.randn(1, 2**16, 1, 8, generator=gen) * 0.1).half()
            tensors[f"{layer}.scales"] = (torch.rand(out_f, 1, 1, 1, generator=gen) + 0.5).half()
        else:
            tensors[key] = t.clone()
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    path.mkdir()
    for shard, names in shards.items():
        save_file({k: tensors[k] for k in names}, str(path / shard), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: s for s, names in shards.items() for k in names}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    config = model.config.to_dict()
    config["quantization_config"] = {
        "quant_method": "aqlm",
        "in_group_size": 8,
        "out_group_size": 1,
        "num_codebooks": 1,
        "nbits_per_codebook": 16,
        "linear_weights_not_to_quantize": ["model.embed_tokens.weight", "lm_head.weight"],
    }
    (path / "config.json").write_text(json.dumps(config))
    return tensors


def test_import_published_style_folder_matches_dense_reference(tmp_path):
    gen = torch.Generator().manual_seed(5)
    src = tmp_path / "published"
    written = _published_style_folder(src, gen)

    model, tokenizer = import_aqlm(src)
    assert tokenizer is None
    layer = model.model.layers[0].mlp.gate_proj
    assert isinstance(layer, CodebookLinear) and layer.fmt.nbits_per_codebook == 16
    assert model.model.embed_tokens.weight.dtype == torch.float16  # tensors keep their dtype
    state = model.state_dict()
    for key, t in written.items():
        if key.endswith(".codes"):
            assert torch.equal(unpack_codes(state[key], 16), unpack_int_data(t, 16)), key
        else:
            assert state[key].dtype == t.dtype and torch.equal(state[key], t), key
    # Independent reference: the dense weight by hand from aqlm's definition, in float64.
    codes = unpack_int_data(written["model.layers.0.mlp.gate_proj.codes"], 16)[..., 0]  # [out, in/8]
    codebook = written["model.layers.0.mlp.gate_proj.codebooks"][0, :, 0].double()  # [2^16, 8]
    scales = written["model.layers.0.mlp.gate_proj.scales"].double().reshape(-1, 1)
    expected = codebook[codes].reshape(codes.shape[0], -1) * scales
    torch.testing.assert_close(layer.dequantize().double(), expected, rtol=2e-3, atol=1e-4)

    save_aqlm(model, tmp_path / "again")  # re-export: every tensor identical
    _assert_same_tensors(load_file(str(tmp_path / "again" / "model.safetensors")), written)
    # ... and stock transformers + aqlm load the re-export (module names listed too) with the same logits
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "again", dtype=torch.float32)
    assert type(hf.lm_head) is nn.Linear and isinstance(hf.model.layers[0].mlp.gate_proj, aqlm.QuantizedLinear)
    with torch.no_grad():
        ref = model.float()(_ids()).logits
        torch.testing.assert_close(hf(_ids()).logits, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


# --------------------------------------------------------------------------------------------
# Refusals


def _export_error(tmp_path, model, capsys) -> str:
    """Save ``model`` as a lit_cb folder, export it with the CLI, expect failure; returns stderr."""
    save_compressed(model, tmp_path / "lit")
    out = tmp_path / "aqlm"
    assert export_cli.main([str(tmp_path / "lit"), "--format", "aqlm", "--out", str(out)]) == 1
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial folder left
    return capsys.readouterr().err


def _with_slots(model: LlamaForCausalLM, seed: int = 5) -> dict[str, int]:
    """Low-rank slots (as merged LoRA adapters leave them, fp16) on some compressed layers of ``model``,
    of two ranks; returns name -> rank."""
    gen = torch.Generator().manual_seed(seed)
    ranks = {
        "model.layers.0.self_attn.q_proj": 2,
        "model.layers.0.mlp.down_proj": 2,
        "model.layers.1.self_attn.o_proj": 4,
    }
    for name, rank in ranks.items():
        layer = model.get_submodule(name)
        layer.add_low_rank(torch.randn(rank, 64, generator=gen) * 0.3, torch.randn(64, rank, generator=gen) * 0.3)
    return ranks


def test_low_rank_slots_export_as_a_peft_adapter_that_restores_the_function(tmp_path, tiny_tokenizer, capsys):
    """A recovered model whose LoRA adapters were merged into compressed layers: AQLM's QuantizedLinear
    has no slot, so the slots go to <out>/lora as a peft adapter; stock transformers + aqlm + peft
    then compute lit_cb's logits, and without the adapter they do not."""
    from peft import PeftModel

    model = _codebook_model(2, 8)
    ranks = _with_slots(model)
    lit_dir, aqlm_dir = tmp_path / "lit", tmp_path / "aqlm"
    save_compressed(model, lit_dir, tiny_tokenizer)
    assert export_cli.main([str(lit_dir), "--format", "aqlm", "--out", str(aqlm_dir)]) == 0
    assert "peft LoRA adapter" in capsys.readouterr().out

    assert not [k for k in load_file(str(aqlm_dir / "model.safetensors")) if "low_rank" in k]
    adapter = load_file(str(aqlm_dir / "lora" / "adapter_model.safetensors"))
    assert len(adapter) == 2 * len(ranks)
    for name in ranks:  # the slot's factors as they are: scaling alpha / r = 1
        layer = model.get_submodule(name)
        assert torch.equal(adapter[f"base_model.model.{name}.lora_A.weight"], layer.low_rank_a.detach())
        assert torch.equal(adapter[f"base_model.model.{name}.lora_B.weight"], layer.low_rank_b.detach())

    lit, _, _ = load_compressed(lit_dir)
    ids = _ids()
    with torch.no_grad():
        lit_fp32 = nn.Module.float(lit)(ids).logits
        hf = AutoModelForCausalLM.from_pretrained(aqlm_dir, dtype=torch.float32)
        without = hf(ids).logits
        peft_model = PeftModel.from_pretrained(hf, aqlm_dir / "lora").eval()
        for name, rank in ranks.items():
            wrapped = peft_model.base_model.model.get_submodule(name)
            assert isinstance(wrapped.base_layer, aqlm.QuantizedLinear) and wrapped.r["default"] == rank
            assert wrapped.scaling["default"] == 1.0
        with_adapter = peft_model(ids).logits
    scale = float(lit_fp32.abs().max())
    assert (without - lit_fp32).abs().max() > 1e-2 * scale  # the slots matter at this size
    torch.testing.assert_close(with_adapter, lit_fp32, rtol=1e-4, atol=1e-5 * scale)

    # The export's card says so, and its code (transformers + aqlm + peft) runs as written.
    card = (aqlm_dir / "README.md").read_text()
    assert "An AQLM model (2x8 g8, out group 1)" in card and "low-rank corrections of 3 compressed layers" in card
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    check = "\nassert type(model).__name__.startswith('Peft')"
    check += "\nassert len(model.peft_config['default'].target_modules) == 3\n"
    proc = subprocess.run([sys.executable, "-c", code + check], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_lit_cb_generate_serves_the_export_with_its_adapter(tmp_path, tiny_tokenizer, capsys):
    """lit_cb generate (and chat, through the same load) on an AQLM export puts lora/ on the model."""
    from lit_cb.generate import load, main

    model = _codebook_model(2, 8)
    ranks = _with_slots(model)
    lit_dir, aqlm_dir = tmp_path / "lit", tmp_path / "aqlm"
    save_compressed(model, lit_dir, tiny_tokenizer)
    export_aqlm(lit_dir, aqlm_dir)
    served, _ = load(str(aqlm_dir), torch.device("cpu"), torch.float32)
    for name in ranks:
        layer = served.get_submodule(name)
        assert isinstance(layer.base_layer, aqlm.QuantizedLinear) and "default" in layer.lora_A
    ids = _ids()
    with torch.no_grad():
        ref = nn.Module.float(load_compressed(lit_dir)[0])(ids).logits
        torch.testing.assert_close(served(ids).logits, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    texts = []
    for folder in (lit_dir, aqlm_dir):
        assert main([str(folder), "--prompt", "the state of", "--max-new-tokens", "6", "--no-chat-template"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1]


def test_import_merges_the_adapter_back_into_the_same_slots(tmp_path, tiny_tokenizer):
    original = _codebook_model(2, 8, seed=3)
    _with_slots(original)
    lit_dir, aqlm_dir = tmp_path / "lit", tmp_path / "aqlm"
    save_compressed(original, lit_dir, tiny_tokenizer)
    export_aqlm(lit_dir, aqlm_dir)
    assert export_cli.main([str(aqlm_dir), "--format", "lit_cb", "--out", str(tmp_path / "back")]) == 0
    back, _, _ = load_compressed(tmp_path / "back")
    _assert_same_tensors(back.state_dict(), original.state_dict())  # slots included, bit for bit
    save_aqlm(back, tmp_path / "again")
    for part in ("model.safetensors", "lora/adapter_model.safetensors"):
        _assert_same_tensors(load_file(str(tmp_path / "again" / part)), load_file(str(aqlm_dir / part)))


@pytest.mark.parametrize(
    "key,value", [("use_dora", True), ("lora_bias", True), ("bias", "all"), ("modules_to_save", ["lm_head"])]
)
def test_an_adapter_that_is_not_plain_lora_is_refused_on_import(tmp_path, tiny_tokenizer, key, value):
    model = _codebook_model(2, 8)
    _with_slots(model)
    save_compressed(model, tmp_path / "lit", tiny_tokenizer)
    export_aqlm(tmp_path / "lit", tmp_path / "aqlm")
    cfg_path = tmp_path / "aqlm" / "lora" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(ValueError, match=rf"{key}={value!r}; a low-rank slot holds a plain LoRA".replace("[", r"\[")):
        import_aqlm(tmp_path / "aqlm")


def test_rtn_layer_is_refused_naming_the_layer(tmp_path, capsys):
    from lit_cb.quant.rtn import RTNConfig, quantize_rtn

    model = _codebook_model(2, 8)
    dense = _llama().model.layers[0].mlp.up_proj
    rtn = quantize_rtn(dense.weight.data, torch.eye(64), RTNConfig(bits=4, group_size=16), None)
    model.model.layers[0].mlp.up_proj = rtn
    err = _export_error(tmp_path, model, capsys)
    assert "model.layers.0.mlp.up_proj" in err and type(rtn).__name__ in err


def test_mixed_formats_are_refused_naming_the_layer(tmp_path, capsys):
    model = _codebook_model(2, 8)
    gen = torch.Generator().manual_seed(1)
    model.model.layers[1].mlp.down_proj = _random_layer(_llama().model.layers[1].mlp.down_proj, 1, 8, 8, 1, gen)
    err = _export_error(tmp_path, model, capsys)
    assert "model.layers.1.mlp.down_proj" in err and "one format" in err


def test_bias_the_architecture_lacks_is_refused(tmp_path):
    model = _codebook_model(1, 8)
    biased = _random_layer(nn.Linear(64, 64, bias=True), 1, 8, 8, 1, torch.Generator().manual_seed(2))
    model.model.layers[0].self_attn.q_proj = biased
    with pytest.raises(AQLMFormatError, match=r"model\.layers\.0\.self_attn\.q_proj: bias=True"):
        save_aqlm(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_nonempty_out_is_refused_and_left_alone(tmp_path, capsys):
    save_compressed(_codebook_model(1, 8), tmp_path / "lit")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert export_cli.main([str(tmp_path / "lit"), "--format", "aqlm", "--out", str(out)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    # an existing *empty* folder is fine
    (out / "keep.txt").unlink()
    assert export_cli.main([str(tmp_path / "lit"), "--format", "aqlm", "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file()


def test_cli_refuses_bad_inputs(tmp_path, capsys):
    save_compressed(_codebook_model(1, 8), tmp_path / "lit")
    assert export_cli.main([str(tmp_path / "lit"), "--format", "lit_cb", "--out", str(tmp_path / "x")]) == 1
    assert "is not an AQLM folder" in capsys.readouterr().err
    assert export_cli.main([str(tmp_path / "nowhere"), "--format", "aqlm", "--out", str(tmp_path / "x")]) == 1
    assert "nowhere" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export_cli.main([str(tmp_path / "lit"), "--format", "gguf", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------------------------
# A model compressed by lit_cb's AQLM method, through AQLM and back, then recovered


def _recover(model: nn.Module, config, ids: torch.Tensor):
    """A few RecoveryModule steps with a real Lightning Trainer on one fixed batch; returns the
    module and the loss on that batch before and after."""
    import lightning as L

    from lit_cb.recovery import RecoveryModule

    def loss() -> float:
        with torch.no_grad():
            logits = module(ids)
        return float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()))

    module = RecoveryModule(model, config)
    module.configure_model()
    before = loss()
    loader = torch.utils.data.DataLoader([{"input_ids": row} for row in ids], batch_size=len(ids))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=config.max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=loader)
    module.eval()
    return module, before, loss()


def test_aqlm_compressed_model_round_trips_and_recovers(tmp_path, capsys):
    from lit_cb.compress import CompressionConfig, compress_model
    from lit_cb.recovery import RecoveryConfig

    windows = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    model = _llama()
    method = {"num_codebooks": 1, "nbits_per_codebook": 8, "in_group_size": 8, "max_epochs": 1, "beam_size": 2}
    method.update(codebook_steps=5, init_kmeans_iters=2)  # tiny settings: the format, not the quality, is tested
    compress_model(model, windows, CompressionConfig(method="aqlm", method_config=method), "cpu", progress=False)
    save_compressed(model, tmp_path / "lit")
    export_aqlm(tmp_path / "lit", tmp_path / "aqlm")
    imported, _ = import_aqlm(tmp_path / "aqlm")
    _assert_same_tensors(imported.state_dict(), model.state_dict())

    ids = windows[:2]
    # LoRA on the compressed layers + codebooks/scales/norms: the loss must drop.
    cfg = RecoveryConfig(max_steps=6, lr=1e-2, codebook_lr=1e-3, warmup_steps=0, lora_r=4, lora_on_compressed=True)
    cfg.train_codebooks = cfg.train_norms = True
    module, before, after = _recover(imported, cfg, ids)
    assert after < before - 0.05, (before, after)
    merged = module.merged_model()
    # The merged adapters live in low-rank slots, which AQLM cannot hold: they export as the peft
    # adapter lora/, and stock transformers + aqlm + peft compute the recovered model's logits.
    from peft import PeftModel

    save_aqlm(merged, tmp_path / "lora_out")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "lora_out", dtype=torch.float32)
    served = PeftModel.from_pretrained(hf, tmp_path / "lora_out" / "lora").eval()
    with torch.no_grad():
        ref = nn.Module.float(merged)(ids).logits
        torch.testing.assert_close(served(ids).logits, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))

    # Codebooks/scales/norms only: still AQLM-expressible; the recovered model exports and loads.
    imported, _ = import_aqlm(tmp_path / "aqlm")
    cfg = RecoveryConfig(max_steps=6, lr=1e-2, codebook_lr=1e-3, warmup_steps=0, lora_r=0)
    cfg.train_codebooks = cfg.train_norms = True
    module, before, after = _recover(imported, cfg, ids)
    assert after < before - 0.05, (before, after)
    recovered = module.merged_model()
    assert not torch.equal(recovered.model.layers[0].mlp.up_proj.codebooks, model.model.layers[0].mlp.up_proj.codebooks)
    save_aqlm(recovered, tmp_path / "recovered")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "recovered", dtype=torch.float32)
    with torch.no_grad():
        ref = recovered.float()(ids).logits
        torch.testing.assert_close(hf(ids).logits, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
