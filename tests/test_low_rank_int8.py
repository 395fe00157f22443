"""8-bit low-rank slots (recovery.low_rank_bits=8): int8 factors with one fp16 scale per rank component.
Checked against hand-computed bits, the rounding bound, the bytes on disk, and a run whose saved model
re-evaluates to the perplexity the run printed (what was evaluated is what was saved)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from lit_cb.config import load_config
from lit_cb.layers import CodebookFormat, CodebookLinear
from lit_cb.pipeline import run
from lit_cb.serialization import bits_per_weight_on_disk, load_compressed, save_compressed

from .conftest import TINY_RUN, save_tiny_model, tiny_llama


def _layer(rank: int = 2, seed: int = 0) -> CodebookLinear:
    g = torch.Generator().manual_seed(seed)
    fmt = CodebookFormat(64, 32, in_group_size=4, nbits_per_codebook=4)
    layer = CodebookLinear.from_tensors(
        fmt, torch.randint(0, 16, (32, 16, 1), generator=g), torch.randn(1, 16, 1, 4, generator=g), torch.rand(32) + 0.5
    )
    layer.add_low_rank(torch.randn(rank, 64, generator=g) * 0.1, torch.randn(32, rank, generator=g) * 0.1)
    return layer


def test_rounding_moves_each_entry_by_at_most_half_a_step_and_halves_the_slots_bits():
    layer = _layer(rank=2)
    a, b = layer.low_rank_a.float().clone(), layer.low_rank_b.float().clone()
    # by hand: codes 32*16*4 bits + codebook 16*4*16 + scales 32*16 = 3584 bits over 2048 weights = 1.75;
    # an fp16 rank-2 slot adds 16*2*(64+32) = 3072 bits, an 8-bit one 8*2*96 + 2*2*16 (scales) = 1600
    assert layer.bits_per_weight() == pytest.approx((3584 + 3072) / 2048)
    layer.round_low_rank(8)
    assert layer.bits_per_weight() == pytest.approx((3584 + 1600) / 2048)
    sa, sb = layer.low_rank_a_scale.float(), layer.low_rank_b_scale.float()
    assert torch.allclose(sa, (a.abs().amax(1) / 127).half().float()) and sb.shape == (2,)
    step_a, step_b = sa[:, None].expand_as(a), sb[None, :].expand_as(b)
    fp16_slack = 2**-10  # the rounded value is itself stored in fp16
    assert ((layer.low_rank_a.float() - a).abs() <= step_a / 2 + fp16_slack * a.abs()).all()
    assert ((layer.low_rank_b.float() - b).abs() <= step_b / 2 + fp16_slack * b.abs()).all()
    qa, qb = layer.low_rank_int8()
    assert qa.dtype == torch.int8 and qa.abs().max() == 127 and qb.abs().max() == 127
    assert torch.equal((qa.float() * sa[:, None]).half(), layer.low_rank_a.data)  # exactly int8 x scale
    layer.round_low_rank(8)  # a second rounding changes nothing
    assert torch.equal((qa.float() * sa[:, None]).half(), layer.low_rank_a.data)
    layer.add_low_rank(torch.ones(1, 64), torch.ones(32, 1))  # a new adapter: a 16-bit slot again
    assert layer.low_rank_bits == 16 and layer.low_rank_a_scale is None and layer.rank == 3


def test_an_8_bit_slot_is_stored_as_int8_and_loads_bit_identical(tmp_path, tiny_tokenizer):
    model = tiny_llama(vocab=len(tiny_tokenizer))
    layer = CodebookLinear.from_tensors(
        CodebookFormat(128, 64, in_group_size=4, nbits_per_codebook=4),
        torch.randint(0, 16, (64, 32, 1)),
        torch.randn(1, 16, 1, 4) * 0.1,
        torch.rand(64) + 0.5,
    )
    layer.add_low_rank(torch.randn(4, 128) * 0.1, torch.randn(64, 4) * 0.1)
    layer.round_low_rank(8)
    model.model.layers[0].mlp.down_proj = layer
    folder = save_compressed(model, tmp_path / "model", tiny_tokenizer)
    tensors = load_file(str(folder / "model.safetensors"))
    key = "model.layers.0.mlp.down_proj"
    assert tensors[f"{key}.low_rank_a"].dtype == torch.int8 and tensors[f"{key}.low_rank_b"].dtype == torch.int8
    assert tensors[f"{key}.low_rank_a_scale"].dtype == torch.float16
    # on disk: 4*(128+64) int8 bytes + 8 fp16 scales, exactly the nominal count (no padding)
    assert bits_per_weight_on_disk(folder)["compressed_linears"] == pytest.approx(layer.bits_per_weight(), abs=0)
    back = load_compressed(folder)[0].model.layers[0].mlp.down_proj
    assert back.low_rank_bits == 8
    assert torch.equal(back.low_rank_a, layer.low_rank_a) and torch.equal(back.low_rank_b, layer.low_rank_b)


def test_a_recovery_with_8_bit_slots_saves_what_it_evaluated(tmp_path, tiny_tokenizer):
    model_dir = save_tiny_model(tmp_path / "tiny", tiny_tokenizer)
    metrics = {}
    for bits in (16, 8):
        values = {**TINY_RUN, "run_name": f"r{bits}", "output_dir": str(tmp_path / "out"), "model.name": model_dir}
        values.update({"recovery.max_steps": 6, "recovery.low_rank_bits": bits, "eval.recovered": True})
        cfg = load_config(None, [f"{k}={v}" for k, v in values.items()])
        metrics[bits] = run(cfg)
    r16, r8 = (metrics[b]["bits_per_weight_recovered"]["compressed_linears"] for b in (16, 8))
    base = metrics[8]["bits_per_weight"]["compressed_linears"]
    # every compressed linear of the tiny model (2 blocks x 7) carries a rank-4 slot: 8-bit factors cost
    # half the fp16 factors' bits plus 2 x 4 fp16 scales per layer
    slots16 = r16 - base
    scales = 14 * 2 * 4 * 16 / metrics[8]["bits_per_weight"]["compressed_params"]
    assert r8 - base == pytest.approx(slots16 / 2 + scales, rel=1e-9)
    ppl16, ppl8 = (metrics[b]["wikitext2_ppl"]["recovered"] for b in (16, 8))
    assert math.isfinite(ppl8) and abs(ppl8 - ppl16) / ppl16 < 0.02  # the same training, rounded slots
    folder = tmp_path / "out" / "r8" / "model"
    spec = json.loads((folder / "config.json").read_text())["quantization_config"]["modules"]
    assert {s["low_rank_bits"] for s in spec.values()} == {8}
    from lit_cb.configs.evaluate import EvaluateConfig
    from lit_cb.evaluate import evaluate_saved

    again = evaluate_saved(EvaluateConfig(model_dir=str(folder), accelerator="cpu"))
    assert again["perplexity"] == pytest.approx(ppl8, rel=1e-6)


def test_other_slot_widths_are_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"recovery.low_rank_bits=4 is not allowed; use one of \(16, 8\)"):
        load_config(None, ["recovery.low_rank_bits=4", f"output_dir={tmp_path}"])


def test_an_8_bit_slot_exports_to_aqlm_as_its_float_adapter(tmp_path, tiny_tokenizer):
    from lit_cb.interop.aqlm import export_aqlm

    model = tiny_llama(vocab=len(tiny_tokenizer), intermediate=64)
    model.model.layers[1].self_attn.q_proj = CodebookLinear.from_tensors(
        CodebookFormat(64, 64, in_group_size=4, nbits_per_codebook=4),
        torch.randint(0, 16, (64, 16, 1)),
        torch.randn(1, 16, 1, 4),
        torch.rand(64) + 0.5,
    )
    q = model.model.layers[1].self_attn.q_proj
    q.add_low_rank(torch.randn(2, 64) * 0.1, torch.randn(64, 2) * 0.1)
    q.round_low_rank(8)
    export_aqlm(save_compressed(model, tmp_path / "lit", tiny_tokenizer), tmp_path / "aqlm")
    assert not [k for k in load_file(str(tmp_path / "aqlm" / "model.safetensors")) if "low_rank" in k]
    adapter = load_file(str(tmp_path / "aqlm" / "lora" / "adapter_model.safetensors"))
    name = "base_model.model.model.layers.1.self_attn.q_proj"
    assert torch.equal(adapter[f"{name}.lora_A.weight"], q.low_rank_a.detach())
    assert torch.equal(adapter[f"{name}.lora_B.weight"], q.low_rank_b.detach())
