"""Sequential compression: order of calibration, resume, save/load, bits accounting."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from lit_cb.compress import CompressionConfig, bits_per_weight, capture_block_inputs, compress_model, run_block
from lit_cb.layers import CodebookLinear
from lit_cb.quant import registry
from lit_cb.quant.rtn import RTNConfig, quantize_rtn
from lit_cb.serialization import load_compressed, save_compressed

from .conftest import tiny_llama

RECORDED: dict[str, torch.Tensor] = {}


@dataclass(frozen=True)
class RecordingRTN:
    """A probe method for the tests: RTN that records the Hessian it was given, by weight id."""

    bits: int = 4
    group_size: int = 16


@registry.register_method(RecordingRTN, "recording_rtn_test_probe")
def _recording(weight, hessian, config, bias):
    RECORDED[f"{weight.shape}:{float(weight.sum()):.6f}"] = hessian.clone()
    return quantize_rtn(weight, hessian, RTNConfig(bits=config.bits, group_size=config.group_size), bias)


def _windows(n=6, seq=12, vocab=512, seed=0):
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def test_block_hessians_come_from_compressed_predecessors():
    """Block 1's Hessians must be XᵀX of the outputs of the *compressed* block 0."""
    model = tiny_llama(num_layers=2)
    reference = tiny_llama(num_layers=2)  # same seed, same weights
    windows = _windows()
    RECORDED.clear()
    cfg = CompressionConfig(method="recording_rtn_test_probe", true_sequential=False, forward_batch_size=4)
    compress_model(model, windows, cfg, device="cpu", progress=False)

    # Independent reference: embeddings -> compressed block 0 (taken from the result) -> inputs of block 1.
    inputs, kwargs = capture_block_inputs(reference, windows, torch.device("cpu"), torch.device("cpu"))
    block1_in = run_block(model.model.layers[0], inputs, kwargs, 6, torch.device("cpu"))
    float_block1_in = run_block(reference.model.layers[0], inputs, kwargs, 6, torch.device("cpu"))
    ln = reference.model.layers[1].input_layernorm
    with torch.no_grad():
        x = ln(block1_in).reshape(-1, 64).double()
        x_float = ln(float_block1_in).reshape(-1, 64).double()
    expected = (x.T @ x / x.shape[0]).float()
    q = reference.model.layers[1].self_attn.q_proj.weight
    used = RECORDED[f"{q.shape}:{float(q.float().sum()):.6f}"]
    torch.testing.assert_close(used, expected, rtol=1e-4, atol=1e-5)
    # ... and not those of the float block 0 (the check above can tell them apart).
    assert not torch.allclose(used, (x_float.T @ x_float / x.shape[0]).float(), rtol=1e-4, atol=1e-5)


def test_true_sequential_compresses_every_target_and_reports_bits():
    model = tiny_llama(num_layers=2)
    cfg = CompressionConfig(method="codebook", method_config={"in_group_size": 4, "nbits": 4, "kmeans_iters": 3})
    report = compress_model(model, _windows(), cfg, device="cpu", progress=False)
    compressed = [n for n, m in model.named_modules() if isinstance(m, CodebookLinear)]
    assert len(compressed) == 14 and len(report.layers) == 14
    assert all(0 <= r.relative_error < 1 for r in report.layers)
    bpw = bits_per_weight(model)
    # Hand count for one 64x64 layer at g4 B4: codes 1 bit/weight + 16x4 fp16 codebook + 64 fp16 scales.
    assert bpw["compressed_linears"] > 1.0
    assert bpw["whole_model"] > bpw["compressed_linears"]


def test_keep_dense_keeps_the_most_salient_layers_dense():
    model = tiny_llama(num_layers=2)
    cfg = CompressionConfig(method="rtn", method_config={"bits": 2, "group_size": 16}, keep_dense=3)
    report = compress_model(model, _windows(), cfg, device="cpu", progress=False)
    assert len(report.kept_dense) == 3
    for name in report.kept_dense:
        assert isinstance(model.get_submodule(name), torch.nn.Linear)
    assert len(report.layers) == 11


@pytest.mark.parametrize("block_finetune", [None, {"epochs": 3, "lr": 3e-4, "batch_size": 2}])
def test_interrupted_run_resumes_to_the_same_model(tmp_path, monkeypatch, block_finetune):
    # With block fine-tuning the norms change too, and a resumed block must bring them back.
    cfg = CompressionConfig(
        method="codebook",
        method_config={"in_group_size": 4, "nbits": 3, "kmeans_iters": 2},
        block_finetune=block_finetune,
    )
    full = tiny_llama(num_layers=3)
    compress_model(full, _windows(), cfg, device="cpu", progress=False)

    interrupted = tiny_llama(num_layers=3)
    calls = {"n": 0}
    original = registry.quantize_linear

    def failing(layer, hessian, config):
        calls["n"] += 1
        if calls["n"] > 9:  # dies inside block 1 (7 linears a block)
            raise KeyboardInterrupt
        return original(layer, hessian, config)

    monkeypatch.setattr(registry, "quantize_linear", failing)
    with pytest.raises(KeyboardInterrupt):
        compress_model(interrupted, _windows(), cfg, device="cpu", resume_dir=tmp_path, progress=False)
    monkeypatch.setattr(registry, "quantize_linear", original)
    assert (tmp_path / "block_000.safetensors").is_file() and not (tmp_path / "block_001.safetensors").exists()

    resumed = tiny_llama(num_layers=3)
    report = compress_model(resumed, _windows(), cfg, device="cpu", resume_dir=tmp_path, progress=False)
    assert len(report.layers) == 21
    if block_finetune:
        norm = "model.layers.0.input_layernorm.weight"
        assert not torch.equal(full.state_dict()[norm], tiny_llama(num_layers=3).state_dict()[norm])
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)


def test_resume_with_a_different_config_is_refused(tmp_path):
    cfg = CompressionConfig(method="rtn", method_config={"bits": 4, "group_size": 16})
    compress_model(tiny_llama(1), _windows(), cfg, device="cpu", resume_dir=tmp_path, progress=False)
    other = CompressionConfig(method="rtn", method_config={"bits": 3, "group_size": 16})
    with pytest.raises(ValueError, match="different compression config"):
        compress_model(tiny_llama(1), _windows(), other, device="cpu", resume_dir=tmp_path, progress=False)


def test_save_load_is_bit_exact(tmp_path):
    model = tiny_llama(num_layers=2)
    cfg = CompressionConfig(method="codebook", method_config={"in_group_size": 8, "nbits": 4, "kmeans_iters": 2})
    compress_model(model, _windows(), cfg, device="cpu", progress=False)
    save_compressed(model, tmp_path / "m")
    loaded, _, meta = load_compressed(tmp_path / "m")
    assert set(meta["modules"]) == {n for n, m in model.named_modules() if isinstance(m, CodebookLinear)}
    for (n, a), (n2, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert n == n2 and a.dtype == b.dtype
        assert torch.equal(a, b), n
    ids = _windows(2, 10)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"method": "kmeans"}, "unknown compression method 'kmeans'"),
        ({"method": "codebook", "method_config": {"nbits": 1}}, "nbits"),
        ({"method": "codebook", "method_config": {"groupsize": 4}}, "unknown config key.*groupsize"),
        ({"keep_dense": -1}, "keep_dense"),
        ({"targets": "("}, "targets"),
    ],
)
def test_bad_compression_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CompressionConfig(**kwargs)
