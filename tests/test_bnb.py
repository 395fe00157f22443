"""bitsandbytes 4-bit swap: real Linear4bit layers, outputs within bitsandbytes' own error."""

from __future__ import annotations

import copy

import bitsandbytes as bnb  # noqa: E402
import pytest
import torch
import transformers  # noqa: E402
from torch import nn

from lit_cb.quant.bnb import BnbConfig, bnb_bits_per_weight, make_linear4bit, swap_linears_bnb4  # noqa: E402

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(dtype: torch.dtype) -> nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def bnb_roundtrip_reference(model: nn.Module, quant_type: str, blocksize: int) -> nn.Module:
    """A dense copy whose decoder linears hold bitsandbytes' own quantize->dequantize of the weights."""
    ref = copy.deepcopy(model)
    for name, mod in ref.named_modules():
        if isinstance(mod, nn.Linear) and name != "lm_head":
            q, state = bnb.functional.quantize_4bit(mod.weight.data, blocksize=blocksize, quant_type=quant_type)
            mod.weight.data = bnb.functional.dequantize_4bit(q, state)
    return ref


@pytest.mark.parametrize(
    "dtype,compute,quant_type",
    [(torch.float32, "float32", "nf4"), (torch.float16, "float16", "nf4"), (torch.float32, "float32", "fp4")],
)
def test_swap_matches_bnb_dequantized_dense_model(dtype: torch.dtype, compute: str, quant_type: str) -> None:
    model = tiny_llama(dtype)
    ref = bnb_roundtrip_reference(model, quant_type, 64)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model(ids).logits.float()
        expected = ref(ids).logits.float()
        swap_linears_bnb4(model, BnbConfig(quant_type=quant_type, blocksize=64, compute_dtype=compute))
        got = model(ids).logits.float()
    quant_effect = (dense - expected).abs().max().item()
    assert quant_effect > 1e-3, "4-bit quantization should visibly change the logits"
    # The swapped model must be bitsandbytes' quantization, not something else: its distance to the
    # dense model with bnb-dequantized weights is a small fraction of the quantization effect.
    assert (got - expected).abs().max().item() <= 0.05 * quant_effect + 1e-5


def test_swap_selects_decoder_linears_only() -> None:
    model = tiny_llama(torch.float32)
    swap_linears_bnb4(model, BnbConfig())
    swapped = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(swapped) == 2 * len(LINEAR_NAMES)
    assert {n.rsplit(".", 1)[1] for n in swapped} == set(LINEAR_NAMES)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert type(model.model.embed_tokens) is nn.Embedding
    layer = model.model.layers[0].mlp.up_proj
    assert layer.weight.bnb_quantized and layer.weight.dtype == torch.uint8
    assert layer.weight.quant_state.quant_type == "nf4" and layer.weight.quant_state.blocksize == 64


def test_swap_include_regex_and_callable() -> None:
    model = tiny_llama(torch.float32)
    swap_linears_bnb4(model, BnbConfig(), include=r"\.mlp\.")
    swapped = {n.rsplit(".", 1)[1] for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert swapped == {"gate_proj", "up_proj", "down_proj"}
    model = tiny_llama(torch.float32)
    swap_linears_bnb4(model, BnbConfig(), include=lambda name, mod: name.endswith("layers.1.self_attn.q_proj"))
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 1


def test_bits_per_weight_matches_stored_tensors() -> None:
    torch.manual_seed(0)
    weight = torch.randn(64, 256)
    n = weight.numel()
    layer = make_linear4bit(weight, None, BnbConfig(blocksize=64))
    state = layer.weight.quant_state
    stored = layer.weight.data.numel() * layer.weight.data.element_size() * 8 + state.absmax.numel() * 32
    assert stored / n == bnb_bits_per_weight(BnbConfig(blocksize=64)) == 4.5
    dq = BnbConfig(blocksize=64, compress_statistics=True)
    layer = make_linear4bit(weight, None, dq)
    state = layer.weight.quant_state
    assert state.nested and state.absmax.dtype == torch.uint8
    stored = (
        layer.weight.data.numel() * 8
        + state.absmax.numel() * 8
        + state.state2.absmax.numel() * 32
        + 32  # the float32 offset
    )
    assert stored / n == pytest.approx(bnb_bits_per_weight(dq))
    assert bnb_bits_per_weight(BnbConfig(blocksize=128)) == 4.25


def test_make_linear4bit_keeps_bias_and_dense_forward() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(128, 32)
    layer = make_linear4bit(lin.weight, lin.bias, BnbConfig(compute_dtype="float32"))
    q, state = bnb.functional.quantize_4bit(lin.weight.data, blocksize=64, quant_type="nf4")
    w_hat = bnb.functional.dequantize_4bit(q, state)
    x = torch.randn(3, 128)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ w_hat.T + lin.bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"quant_type": "int4"}, "quant_type"),
        ({"blocksize": 48}, "blocksize"),
        ({"compute_dtype": "float8"}, "compute_dtype"),
        ({"quant_storage": "int3"}, "quant_storage"),
        ({"compress_statistics": 1}, "compress_statistics"),
    ],
)
def test_bad_bnb_config_names_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        BnbConfig(**kwargs)
