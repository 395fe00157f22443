"""lit_cb folders as transformers checkpoints (quant_method "lit_cb"): from_pretrained, save_pretrained,
peft on the loaded model, the pipeline's output, and loud failures (also in a fresh interpreter)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import lit_cb  # noqa: F401  registers quant_method lit_cb
from lit_cb.bitpack import unpack_bits
from lit_cb.compress import CompressionConfig, compress_model
from lit_cb.layers import CodebookLinear, unpack_codes
from lit_cb.serialization import bits_per_weight_on_disk, load_compressed, save_compressed

from .conftest import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "codebook": {"in_group_size": 8, "nbits": 4, "kmeans_iters": 2},
    "aqlm": {
        "num_codebooks": 2,
        "nbits_per_codebook": 4,
        "in_group_size": 8,
        "beam_size": 2,
        "max_epochs": 1,
        "codebook_steps": 3,
        "init_kmeans_iters": 2,
    },
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny ops: one thread avoids OpenMP oversubscription on the shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _windows(n=6, seq=12, vocab=512, seed=0):
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def compressed_tiny_llama(method: str) -> torch.nn.Module:
    model = tiny_llama(num_layers=2)
    cfg = CompressionConfig(method=method, method_config=METHODS[method])
    compress_model(model, _windows(), cfg, device="cpu", progress=False)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_tokenizer):
    """{method: (in-process compressed model, its saved folder)}"""
    out = {}
    for method in METHODS:
        model = compressed_tiny_llama(method)
        out[method] = (model, save_compressed(model, tmp_path_factory.mktemp(method) / "model", tiny_tokenizer))
    return out


def _dequant_f64(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, nbits: int) -> torch.Tensor:
    """The format's definition, written out: W[o*og + r, i*g + c] = scale[o] * sum_m C_m[code[o, i, m]][r, c]."""
    idx = unpack_codes(codes, nbits)
    n_out, n_in, m_count = idx.shape
    _, _, og, g = codebooks.shape
    w = torch.zeros(n_out * og, n_in * g, dtype=torch.float64)
    cb = codebooks.double()
    for o in range(n_out):
        for i in range(n_in):
            block = sum(cb[m, idx[o, i, m]] for m in range(m_count)) * scales[o].double().reshape(())
            w[o * og : (o + 1) * og, i * g : (i + 1) * g] = block
    return w


@pytest.mark.parametrize("method", list(METHODS))
def test_from_pretrained_is_bit_exact_with_equal_logits(saved, method):
    model, folder = saved[method]
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    compressed = {n for n, m in model.named_modules() if isinstance(m, CodebookLinear)}
    assert len(compressed) == 14
    assert {n for n, m in loaded.named_modules() if isinstance(m, CodebookLinear)} == compressed
    expected, got = model.state_dict(), loaded.state_dict()
    assert set(expected) == set(got)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    ids = _windows(2, 10)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)


@pytest.mark.parametrize("method", list(METHODS))
def test_saved_tensors_follow_the_documented_format(saved, method):
    """Read the safetensors file and config.json directly: the dense weight the format defines
    (float64, written out) is what the loaded layer uses, and each compressed layer has a marker."""
    model, folder = saved[method]
    config = json.loads((folder / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "lit_cb" and qc["format_version"] == 2
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    name = "model.layers.1.mlp.down_proj"
    spec = qc["modules"][name]
    assert spec["type"] == "CodebookLinear" and spec["format"]["in_features"] == 128
    expected_m = METHODS[method].get("num_codebooks", 1)
    assert spec["format"]["num_codebooks"] == expected_m
    fmt = spec["format"]
    assert spec["codes_packed"] is True  # 4-bit codes: a lit_cb.bitpack stream of 4 bits per code
    codes_shape = (fmt["out_features"] // fmt["out_group_size"], 128 // fmt["in_group_size"], expected_m)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert bytes(f.get_tensor(f"{name}.weight").tolist()) == b"lit_cb"
        packed = f.get_tensor(f"{name}.codes")
        assert packed.dtype == torch.uint8 and packed.numel() * 2 == math.prod(codes_shape)
        w64 = _dequant_f64(
            unpack_bits(packed, 4, math.prod(codes_shape)).reshape(codes_shape),
            f.get_tensor(f"{name}.codebooks"),
            f.get_tensor(f"{name}.scales"),
            spec["format"]["nbits_per_codebook"],
        )
    layer = loaded.get_submodule(name)
    assert layer.weight.shape == (64, 128)
    torch.testing.assert_close(layer.weight.double(), w64, rtol=1e-3, atol=1e-3)  # fp16 products vs float64
    x = torch.randn(3, 128, dtype=torch.float64)
    torch.testing.assert_close(layer(x.float()).double(), x @ w64.T, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("method", list(METHODS))
def test_save_pretrained_round_trips(saved, method, tmp_path):
    _, folder = saved[method]
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    loaded.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    for (n, a), (n2, b) in zip(loaded.state_dict().items(), again.state_dict().items(), strict=True):
        assert n == n2 and a.dtype == b.dtype and torch.equal(a, b), n
    assert (
        json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
        == json.loads((folder / "config.json").read_text())["quantization_config"]
    )


def test_load_compressed_is_a_wrapper_with_the_run_info(saved, tmp_path):
    model, _ = saved["codebook"]
    folder = save_compressed(model, tmp_path / "m", extra={"wikitext2_ppl": {"compressed": 12.5}})
    loaded, tokenizer, meta = load_compressed(folder)
    assert tokenizer is None
    assert meta["wikitext2_ppl"] == {"compressed": 12.5}
    assert set(meta["modules"]) == {n for n, m in model.named_modules() if isinstance(m, CodebookLinear)}
    via_hf = AutoModelForCausalLM.from_pretrained(folder)
    ids = _windows(1, 8)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, via_hf(input_ids=ids).logits)
    # the model passed in is left as it was (not turned into a quantized transformers model)
    assert "hf_quantizer" not in vars(model) and "is_quantized" not in vars(model)
    assert getattr(model.config, "quantization_config", None) is None


def test_dtype_and_device_map_keep_codebooks_in_their_stored_dtype(saved):
    model, folder = saved["codebook"]
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cpu")
    layer = loaded.model.layers[0].self_attn.q_proj
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert layer.codebooks.dtype == torch.float16  # never cast through bfloat16 (lossy)
    assert torch.equal(layer.codebooks, model.model.layers[0].self_attn.q_proj.codebooks)


def test_peft_lora_on_the_loaded_model_lowers_the_loss(saved):
    """peft LoRA on compressed linears through lit_cb's dispatcher; codes and codebooks stay frozen."""
    from peft import LoraConfig, get_peft_model

    from lit_cb.lora import register_dispatcher

    _, folder = saved["aqlm"]
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    codes_before = loaded.model.layers[0].mlp.up_proj.codes.clone()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(loaded, register_dispatcher(cfg))
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    opt = torch.optim.Adam(trainable, lr=1e-2)
    ids = _windows(4, 16, seed=3)
    losses = []
    for _ in range(15):
        loss = peft_model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.1, losses
    assert torch.equal(loaded.model.layers[0].mlp.up_proj.base_layer.codes, codes_before)


def test_pipeline_output_folder_loads_with_from_pretrained(tmp_path, tiny_tokenizer):
    """A whole (tiny) recipe run with LoRA merged into the compressed layers' low-rank slots."""
    from lit_cb.config import load_config
    from lit_cb.data import CompressionDataModule
    from lit_cb.evaluate import perplexity
    from lit_cb.pipeline import run

    src = tmp_path / "tiny"
    tiny_llama(num_layers=1, vocab=len(tiny_tokenizer)).save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    overrides = {
        "run_name": "tiny",
        "output_dir": str(tmp_path / "out"),
        "model.name": str(src),
        "data.num_calibration_samples": 4,
        "data.calibration_seqlen": 32,
        "data.num_finetune_samples": 16,
        "data.finetune_seqlen": 32,
        "data.num_val_samples": 2,
        "data.eval_seqlen": 64,
        "data.max_eval_windows": 2,
        "data.batch_size": 4,
        "compression.method": "codebook",
        "compression.method_config": "{in_group_size: 4, nbits: 4, kmeans_iters: 2}",
        "recovery.max_steps": 3,
        "recovery.lora_r": 2,
        "recovery.lora_on_compressed": True,
        "eval.float_model": False,
        "trainer.accelerator": "cpu",
    }
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    metrics = run(cfg)
    folder = cfg.run_dir / "model"
    model = AutoModelForCausalLM.from_pretrained(folder)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, CodebookLinear) and q.rank == 2  # the merged adapter's slot came back
    dm = CompressionDataModule(AutoTokenizerFrom(folder), cfg.data)
    assert perplexity(model, dm.test_windows(), progress=False) == pytest.approx(
        metrics["wikitext2_ppl"]["recovered"], rel=1e-5
    )
    # metrics.json: the nominal count and the one measured from model/'s tensors; 4-bit codes pack without
    # padding and codebooks, scales and the merged low-rank slot are fp16, so the two agree.
    on_disk = json.loads((cfg.run_dir / "metrics.json").read_text())["bits_per_weight_on_disk"]
    assert on_disk == bits_per_weight_on_disk(folder) == metrics["bits_per_weight_on_disk"]
    assert on_disk["compressed_linears"] == pytest.approx(metrics["bits_per_weight_recovered"]["compressed_linears"])


def AutoTokenizerFrom(folder: Path):  # noqa: N802  (reads like the transformers call it wraps)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


# ---- bad inputs -------------------------------------------------------------------------------------


def _edit_config(folder: Path, tmp_path: Path, edit) -> Path:
    import shutil

    dst = tmp_path / "edited"
    shutil.copytree(folder, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_a_quant_method_lit_cb_does_not_handle_is_refused(saved, tmp_path):
    folder = _edit_config(saved["codebook"][1], tmp_path, lambda c: c["quantization_config"].update(quant_method="hqq"))
    with pytest.raises(ValueError, match="quant_method='hqq'.*lit_cb loads 'lit_cb'"):
        load_compressed(folder)


UP = "model.layers.0.mlp.up_proj"


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda qc: qc.update(format_version=7), "format_version=7"),
        (lambda qc: qc.update(group_size=8), r"unknown keys \['group_size'\]"),
        (lambda qc: qc["modules"].update({UP: {"type": "Nope"}}), "unknown compressed module"),
        (lambda qc: qc["modules"].update({"model.layers.9.mlp.up_proj": qc["modules"][UP]}), "layers.9.*does not have"),
        (lambda qc: qc["modules"][UP]["format"].update(in_features=128), r"\(128, 128\) \(in, out\).*\(64, 128\)"),
        (lambda qc: qc["modules"][UP].pop("format"), "malformed CodebookLinear spec"),
        (lambda qc: qc.update(modules=[1, 2]), "must map module names to specs"),
    ],
)
def test_a_bad_lit_cb_config_fails_before_loading(saved, tmp_path, edit, match):
    folder = _edit_config(saved["codebook"][1], tmp_path, lambda c: edit(c["quantization_config"]))
    with pytest.raises(ValueError, match=match):
        AutoModelForCausalLM.from_pretrained(folder)


def test_a_missing_or_corrupt_config_gets_a_clear_error(saved, tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(saved["codebook"][1], folder)
    (folder / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        load_compressed(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_compressed(folder)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_compressed(tmp_path / "nowhere")


def test_a_float_folder_is_not_taken_for_a_compressed_one(tmp_path):
    tiny_llama(1).save_pretrained(tmp_path / "float")
    with pytest.raises(ValueError, match="float model .*no quantization_config"):
        load_compressed(tmp_path / "float")


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_without_import_lit_cb_stock_transformers_refuses_the_folder(saved):
    """transformers only warns about an unknown quant_method; the per-layer markers make it fail."""
    code = (
        "import sys\n"
        "from transformers import AutoModelForCausalLM\n"
        f"AutoModelForCausalLM.from_pretrained({str(saved['codebook'][1])!r})\n"
        "print('LOADED', 'lit_cb' in sys.modules)\n"
    )
    proc = _fresh_python(code)
    assert proc.returncode != 0 and "LOADED" not in proc.stdout, proc.stdout + proc.stderr
    assert "Unknown quantization type, got lit_cb" in proc.stderr
    assert "RuntimeError" in proc.stderr and "mismatch" in proc.stderr


def test_import_lit_cb_is_cheap_and_registers_when_transformers_loads_quantizers():
    code = (
        "import sys, lit_cb\n"
        "heavy = [m for m in ('torch', 'transformers', 'lightning') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AUTO_QUANTIZATION_CONFIG_MAPPING\n"
        "print(AUTO_QUANTIZER_MAPPING['lit_cb'].__name__, AUTO_QUANTIZATION_CONFIG_MAPPING['lit_cb'].__name__)\n"
        "assert 'lightning' not in sys.modules\n"
    )
    proc = _fresh_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["LitCbHfQuantizer", "LitCbConfig"]


def test_registration_waits_while_hf_quantizer_is_mid_import():
    """transformers 5.17 loads its quantizer registry while lit_cb.hf_quantizer is importing
    transformers (seen on the GPU machine: `lit_cb export` failed with a circular import); the hook
    must leave the registration to the module, which registers itself at its end."""
    import subprocess
    import sys

    code = """
import sys, types
import lit_cb
sys.modules["lit_cb.hf_quantizer"] = types.ModuleType("lit_cb.hf_quantizer")  # as during its import
lit_cb._register_quantizer()  # must not raise ImportError
del sys.modules["lit_cb.hf_quantizer"]
import lit_cb.hf_quantizer as hq
import transformers.quantizers.auto as auto
assert hq.QUANT_METHOD in auto.AUTO_QUANTIZER_MAPPING
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
