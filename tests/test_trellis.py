"""The computed-codes trellis format (lit_cb.trellis) and its quantizer (lit_cb.quant.trellis), against
independent references: brute-force walks, dense float64 rotations and matmuls, the registry, peft, and a
save/load round trip through transformers."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lit_cb.configs.trellis import TrellisConfig
from lit_cb.quant import registry
from lit_cb.trellis import (
    HASH_ADD,
    HASH_MUL,
    InputRotation,
    TrellisFormat,
    TrellisLinear,
    computed_values,
    shared_rotations,
    symbols_to_states,
    tiles_to_matrix,
    viterbi,
    walk_to_symbols,
)

ROOT = Path(__file__).resolve().parents[1]


def _hash_value(s: int) -> float:
    x = (s * HASH_MUL + HASH_ADD) % 2**32
    return (sum((x >> (8 * i)) & 0xFF for i in range(4)) - 510) / (4 * (256**2 - 1) / 12) ** 0.5


def test_computed_values_are_the_hash_and_close_to_unit_gaussian():
    v = computed_values(12)
    for s in (0, 1, 7, 1234, 4095):
        assert float(v[s]) == pytest.approx(_hash_value(s), abs=1e-6)
    assert abs(float(v.mean())) < 0.05 and 0.9 < float(v.std()) < 1.1


def _random_walks(n: int, t_len: int, state_bits: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    first = torch.randint(0, 2**state_bits, (n,), generator=gen)
    bits = torch.randint(0, 2**k, (n, t_len - 1), generator=gen)
    states = [first]
    for t in range(t_len - 1):
        states.append(((states[-1] << k) | bits[:, t]) & (2**state_bits - 1))
    return torch.stack(states, dim=1)


@pytest.mark.parametrize(("state_bits", "k"), [(12, 2), (6, 3), (8, 1)])
def test_symbols_round_trip_and_cost_k_bits_a_step(state_bits, k):
    walks = _random_walks(5, 40, state_bits, k, seed=state_bits)
    symbols = walk_to_symbols(walks, state_bits, k)
    assert symbols.shape == (5, state_bits // k - 1 + 40) and int(symbols.max()) < 2**k
    assert torch.equal(symbols_to_states(symbols, state_bits, k), walks)


def test_symbols_refuse_states_that_are_not_a_walk():
    walks = _random_walks(2, 10, 12, 2, seed=0)
    walks[1, 5] ^= 1 << 11  # a top bit the shift could not have produced
    with pytest.raises(ValueError, match="not a walk"):
        walk_to_symbols(walks, 12, 2)


def test_viterbi_matches_brute_force_with_computed_values():
    nb, k, t_len = 4, 2, 4
    values = computed_values(nb)
    x = torch.randn(3, t_len, generator=torch.Generator().manual_seed(3))
    walks = viterbi(x, values, k)
    for n in range(3):
        best = min(
            sum((float(x[n, t]) - float(values[s])) ** 2 for t, s in enumerate(walk))
            for walk in (
                list(itertools.accumulate(bits, lambda s, b: ((s << k) | b) & (2**nb - 1), initial=s0))
                for s0 in range(2**nb)
                for bits in itertools.product(range(2**k), repeat=t_len - 1)
            )
        )
        got = sum((float(x[n, t]) - float(values[s])) ** 2 for t, s in enumerate(walks[n].tolist()))
        assert got == pytest.approx(best, rel=1e-5)


@pytest.mark.parametrize("n", [96, 576, 40])
def test_input_rotation_is_orthogonal_and_unrotate_inverts_it(n):
    rot = InputRotation(n, seed=1)
    r = rot.rotate(torch.eye(n, dtype=torch.float64))  # rows: e_i R, so this is R itself
    assert torch.allclose(r @ r.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    x = torch.randn(3, n, dtype=torch.float64)
    assert torch.allclose(rot.rotate(x), x @ r, atol=1e-12)
    assert torch.allclose(rot.unrotate(rot.rotate(x)), x, atol=1e-12)
    a = torch.randn(n, n, dtype=torch.float64)
    h = a @ a.T
    assert torch.allclose(rot.rotate_hessian(h), r.T @ h @ r, atol=1e-9)
    assert rot.p * rot.m == n and rot.p & (rot.p - 1) == 0


@pytest.mark.parametrize("n", [2, 96, 1536, 2048])
def test_input_rotation_is_signs_then_sylvester_hadamard_groups_then_the_mix(n):
    """R = diag(signs) (I_m (x) H_p) (mix (x) I_p) (no mix for one group), built densely from the bit-parity
    form of Sylvester's matrix, H[i, j] = (-1)**popcount(i & j) / sqrt(p): the factored (Kronecker) transform
    must be exactly this map."""
    rot = InputRotation(n, seed=4)
    idx = torch.arange(rot.p)
    parity = torch.tensor([[bin(i & j).count("1") % 2 for j in idx.tolist()] for i in idx.tolist()])
    had = (1 - 2 * parity).double() / rot.p**0.5
    dense = torch.diag(rot._signs) @ torch.block_diag(*[had] * rot.m)
    if rot.m > 1:
        dense = dense @ torch.kron(rot._mix.contiguous(), torch.eye(rot.p).double())
    assert torch.allclose(rot.rotate(torch.eye(n, dtype=torch.float64)), dense, atol=1e-12)


def _layer(out_f: int = 64, in_f: int = 48, bias: bool = True, seed: int = 0) -> TrellisLinear:
    fmt = TrellisFormat(in_f, out_f, tile_rows=16, tile_cols=8, rotation_seed=seed, bias=bias)
    walks = _random_walks(fmt.num_tiles, fmt.steps, fmt.state_bits, fmt.bits_per_step, seed)
    gen = torch.Generator().manual_seed(seed)
    scales = torch.rand(out_f, generator=gen) + 0.5
    b = torch.randn(out_f, generator=gen) if bias else None
    return TrellisLinear.from_walks(fmt, walks, scales, b, dtype=torch.float32)


def test_forward_is_the_rotated_dense_product_in_float64():
    layer = _layer()
    f = layer.fmt
    walks = symbols_to_states(layer.codes, f.state_bits, f.bits_per_step)
    # Independent decode: tile (b, r) holds rows r*16.., columns b*8.., walked row by row.
    v = computed_values(f.state_bits).double()
    w_r = torch.zeros(f.out_features, f.in_features, dtype=torch.float64)
    row_tiles = f.out_features // f.tile_rows
    for tile in range(f.num_tiles):
        b, r = divmod(tile, row_tiles)
        w_r[r * 16 : (r + 1) * 16, b * 8 : (b + 1) * 8] = v[walks[tile]].reshape(16, 8)
    w_r *= layer.scales.double()
    rot = InputRotation(f.in_features, f.rotation_seed).rotate(torch.eye(f.in_features, dtype=torch.float64))
    x = torch.randn(5, f.in_features)
    ref = x.double() @ rot @ w_r.T + layer.bias.double()
    assert torch.allclose(layer(x).double(), ref, atol=1e-4)
    assert torch.allclose(layer.dequantize().double(), w_r @ rot.T, atol=1e-5)  # W = W_r R^T
    assert torch.equal(tiles_to_matrix(v[walks], f), w_r / layer.scales.double())


def test_bits_count_symbols_and_scales_only():
    fmt = TrellisFormat(576, 576)
    tiles = (576 // 32) * (576 // 8)
    expected = (tiles * (5 + 256) * 2 + 576 * 16) / (576 * 576)
    assert fmt.bits_per_weight() == pytest.approx(expected)
    assert 2.06 < fmt.bits_per_weight() < 2.07


def _hessian(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, n, generator=gen) @ (torch.randn(n, n, generator=gen) * 0.3 + torch.eye(n))
    return x.T @ x / x.shape[0]


def test_quantizer_with_identity_hessian_is_the_exact_walk_of_each_tile():
    """With H = I there is no error feedback, so every tile must be Viterbi's least-squares walk of the
    rotated, scaled weights: checked against an independent Viterbi of each tile."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 32, bias=False)
    cfg = TrellisConfig(state_bits=6, bits_per_step=2, tile_rows=16, tile_cols=8, column_weights=False, damp=0.0)
    layer = registry.quantize_linear(lin, torch.eye(16), cfg)
    assert isinstance(layer, TrellisLinear)
    f = layer.fmt
    target = InputRotation(16, 0).rotate(lin.weight.detach().double()) / layer.scales.double()
    v = computed_values(6)
    walks = symbols_to_states(layer.codes, 6, 2)
    row_tiles = 32 // 16
    for tile in range(f.num_tiles):
        b, r = divmod(tile, row_tiles)
        x = target[r * 16 : (r + 1) * 16, b * 8 : (b + 1) * 8].reshape(1, -1).float()
        best = viterbi(x, v, 2)[0]
        got = float(((x[0] - v[walks[tile]]) ** 2).sum())
        assert got == pytest.approx(float(((x[0] - v[best]) ** 2).sum()), rel=1e-5)


def test_error_feedback_lowers_the_hessian_weighted_error():
    torch.manual_seed(1)
    lin = nn.Linear(64, 64, bias=False)
    h = _hessian(64, 1)
    w = lin.weight.detach().double()

    def err(cfg: TrellisConfig, hess: torch.Tensor) -> float:
        d = registry.quantize_linear(lin, hess, cfg).dequantize().double() - w
        return float(torch.trace(d @ h.double() @ d.T) / torch.trace(w @ h.double() @ w.T))

    cfg = TrellisConfig(tile_rows=32, tile_cols=8)
    with_feedback, without = err(cfg, h), err(cfg, torch.eye(64))
    assert with_feedback < 0.8 * without


def test_config_refuses_bad_values_naming_them():
    with pytest.raises(ValueError, match="state_bits=7"):
        TrellisConfig(state_bits=7, bits_per_step=2)
    with pytest.raises(ValueError, match="tile_rows=0"):
        TrellisConfig(tile_rows=0)
    with pytest.raises(ValueError, match="tile_rows=48 must be >= 1 and divide out_features=64"):
        TrellisFormat(32, 64, tile_rows=48)
    assert registry.config_class("trellis") is TrellisConfig


def test_lora_merges_into_the_low_rank_slot_and_training_moves_only_scales():
    from peft import LoraConfig, get_peft_model

    from lit_cb.block_finetune import trainable_parameters
    from lit_cb.configs.block_finetune import BlockFinetuneConfig
    from lit_cb.lora import register_dispatcher

    model = nn.Sequential()
    model.add_module("proj", _layer())
    x = torch.randn(4, 48)
    base = model(x)
    cfg = register_dispatcher(LoraConfig(r=2, lora_alpha=4, target_modules=["proj"]))
    peft_model = get_peft_model(model, cfg)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p)
    with torch.no_grad():
        adapted = peft_model(x)
    assert not torch.allclose(adapted, base)
    merged = peft_model.merge_and_unload()
    assert isinstance(merged.proj, TrellisLinear) and merged.proj.rank == 2
    assert torch.allclose(merged(x), adapted, atol=1e-5)
    names = [n for n, _ in trainable_parameters(merged, BlockFinetuneConfig(epochs=1))]
    assert names == ["proj.scales"]


def test_saved_model_loads_with_the_same_outputs_and_two_bit_codes_on_disk(tmp_path, tiny_model):
    from lit_cb.compress import _set_submodule
    from lit_cb.serialization import bits_per_weight_on_disk, load_compressed, save_compressed

    model = tiny_model
    torch.manual_seed(0)
    cfg = TrellisConfig(tile_rows=32, tile_cols=8)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        lin = model.get_submodule(name)
        _set_submodule(model, name, registry.quantize_linear(lin, _hessian(lin.in_features, 2), cfg))
    model.get_submodule("model.layers.0.self_attn.q_proj").add_low_rank(torch.randn(2, 64), torch.randn(64, 2) * 0.01)
    model.get_submodule("model.layers.0.self_attn.q_proj").round_low_rank(8)
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    save_compressed(model, tmp_path / "m")
    loaded, _, meta = load_compressed(tmp_path / "m")
    assert meta["modules"]["model.layers.1.mlp.down_proj"]["type"] == "TrellisLinear"
    with torch.no_grad():
        after = loaded(input_ids=ids).logits
    assert isinstance(loaded.get_submodule("model.layers.1.mlp.down_proj"), TrellisLinear)
    assert torch.allclose(before, after, atol=1e-5)
    disk = bits_per_weight_on_disk(tmp_path / "m")
    nominal = [model.get_submodule(n).bits_per_weight() for n in ("model.layers.0.self_attn.q_proj",)]
    assert disk["compressed_linears"] < 3.0 and nominal[0] > 2.0  # codes stored at 2 bits, not 8
    from lit_cb.model_card import lit_cb_card

    card = lit_cb_card(tmp_path / "m")
    assert "2 x TrellisLinear L12 k2 tiles 32x8" in card and "rank 2 in 8 bits: 1" in card


def test_run_config_refuses_code_training_for_the_trellis_before_any_work():
    from lit_cb.config import load_config

    base = ["compression.method=trellis", "compression.method_config={}"]
    with pytest.raises(ValueError, match="code_update_every=10 updates codebook codes.*'trellis'"):
        load_config(ROOT / "configs/smollm2_trellis_lora2.yaml", ["recovery.code_update_every=10"])
    with pytest.raises(ValueError, match="ste_codes=true trains codes.*'trellis'"):
        load_config(ROOT / "configs/smollm2_codebook.yaml", [*base, "recovery.ste_codes=true"])


def test_column_weights_of_a_single_block_are_the_rotated_hessian_diagonal():
    """With one 8-column block, U_BB^-1 U_BB^-T is (U^T U)^-1 = H_r itself, so each tile's walk must be the
    walk that minimises the squared error weighted by diag(R^T H R): checked with an independent Viterbi."""
    torch.manual_seed(2)
    lin = nn.Linear(8, 32, bias=False)
    h = _hessian(8, 5)
    cfg = TrellisConfig(state_bits=6, bits_per_step=2, tile_rows=16, tile_cols=8, damp=0.0)
    layer = registry.quantize_linear(lin, h, cfg)
    r = InputRotation(8, 0).rotate(torch.eye(8, dtype=torch.float64))
    diag = torch.diagonal(r.T @ h.double() @ r)
    d = (diag / diag.mean()).repeat(16).float()
    target = (lin.weight.detach().double() @ r) / layer.scales.double()
    v = computed_values(6)
    walks = symbols_to_states(layer.codes, 6, 2)
    for tile in range(2):
        x = target[tile * 16 : (tile + 1) * 16].reshape(1, -1).float()
        best = viterbi(x, v, 2, weights=d)[0]
        cost = lambda w, x=x: float((d * (x[0] - v[w]) ** 2).sum())  # noqa: E731
        assert cost(walks[tile]) == pytest.approx(cost(best), rel=1e-5)
        assert cost(walks[tile]) <= cost(viterbi(x, v, 2)[0]) * (1 + 1e-6)  # the unweighted walk is no better


def test_layers_reading_one_input_rotate_it_once_and_a_changed_input_is_rotated_again():
    """q/k/v-style sharing: layers of one width given the same tensor reuse its rotation; an in-place change of the
    input (a new version) or a new tensor is rotated afresh; a rotation made without autograd is not reused by a
    call that tracks gradients for its input, nor the other way round. Outputs always equal the float64 product of
    the rotated input and the decoded weights."""
    q, k = _layer(seed=1), _layer(seed=1)  # one rotation seed (layers of one width share the rotation)
    k.scales.data.mul_(2)
    x = torch.randn(3, 48)
    rot = q.rotation()
    assert rot is k.rotation()
    rot.matrix(x)  # the dense R, built once (by a rotation of the identity) before counting
    calls = []
    original = rot.rotate
    rot.rotate = lambda t, **kw: calls.append(1) or original(t, **kw)
    try:
        with torch.no_grad():
            outs = [q(x), k(x)]
            assert len(calls) == 1
            x.mul_(2)  # same object, new version
            outs.append(q(x))
            assert len(calls) == 2
            outs.append(k(x.clone()))  # another tensor
            assert len(calls) == 3
        xg = x.clone().requires_grad_(True)
        for layer in (q, k):
            layer.scales.requires_grad_(True)  # as in recovery: the layers save the rotation for their backward
        kept = (q(xg), k(xg))  # autograd on: shared as well, while the layers' graphs hold it
        assert len(calls) == 4
        q.scales.grad = torch.autograd.grad(kept[0].sum(), q.scales)[0]  # q's graph freed, k's still holds it
        del kept
        assert rot.last_rotated[2]() is None  # the step's graph is gone with its consumers
        q(xg)  # nothing holds the last rotation any more: rotated again (no graph outlives its step)
        assert len(calls) == 5
        for layer in (q, k):
            layer.scales.requires_grad_(False)
        calls.pop()
        with torch.no_grad():  # not the rotation that carries xg's graph
            q(xg)
        assert len(calls) == 5
        with torch.inference_mode():  # inference tensors carry no version counter: kept only when asked
            xi = x.clone()
            q(xi), k(xi)
            assert len(calls) == 7
            with shared_rotations():
                q(xi), k(xi)
            assert len(calls) == 8 and rot.last_rotated is None  # nothing is left behind on exit
    finally:
        rot.rotate = original
    r = InputRotation(48, q.fmt.rotation_seed).rotate(torch.eye(48, dtype=torch.float64))
    for layer, inp, got in zip((q, k, q, k), (x / 2, x / 2, x, x), outs, strict=True):
        ref = inp.double() @ r @ layer.dequantize_rotated().double().T + layer.bias.double()
        assert torch.allclose(got.double(), ref, atol=1e-4)


def test_llama7b_trellis_config_compresses_a_7b_shaped_model_in_the_smoke_bench(tmp_path):
    """bench/compress_7b.py --methods trellis (configs/llama7b_trellis.yaml's compression section at tiny
    LLaMA shapes on the CPU, offloaded activations, block fine-tuning): every linear becomes a TrellisLinear at
    about 2 bits with a bounded error, and the JSON records the per-block time and the 32-block projection."""
    from tests.conftest import load_script

    bench = load_script("bench/compress_7b.py")
    out = tmp_path / "c7.json"
    argv = ["compress_7b.py", "--smoke", "--methods", "trellis", "--layers", "1", "--quiet", "--out", str(out)]
    result = bench.main(argv)
    r = result["methods"]["trellis"]
    assert r["config"]["method"] == "trellis" and r["config"]["method_config"]["bits_per_step"] == 2
    # the tiny block's 4 attention (64x64) and 3 MLP (128x64, 64x128) linears, counted by their formats: 2 bits per
    # weight, a first state per tile, 16-bit row scales (0.125-0.25 bits at these widths, 0.004 at 4096)
    shapes = [(64, 64)] * 4 + [(64, 128), (64, 128), (128, 64)]  # (in, out)
    fmts = [TrellisFormat(i, o, state_bits=8) for i, o in shapes]
    expected = sum(sum(f.storage_bits().values()) for f in fmts) / sum(i * o for i, o in shapes)
    assert r["bits_per_weight"] == pytest.approx(expected) and 2.0 < expected < 2.3
    assert 0 < r["mean_relative_error"] < 0.5
    assert len(r["block_seconds"]) == 1 and r["projected_seconds_32_blocks"] > 0
    assert json.loads(out.read_text())["methods"]["trellis"]["bits_per_weight"] == r["bits_per_weight"]


@pytest.mark.parametrize("name", ["smollm2_trellis_lora2", "smollm2_trellis_lora4q8_long"])
def test_trellis_recovery_configs_stay_inside_issue_14s_bits(name):
    """Issue 14 counts bits over the compressed linears, adapters included: each SmolLM2-135M linear (30 blocks of
    q/o 576x576, k/v 192x576, gate/up 1536x576, down 576x1536) in the config's trellis format with the low-rank
    slot its recovery merges LoRA into (rank and slot bits from the config) must total at most 2.16 bits."""
    from lit_cb.config import load_config

    cfg = load_config(ROOT / f"configs/{name}.yaml")
    mc = cfg.compression.method_config
    shapes = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]  # (in, out)
    bits = weights = 0.0
    for in_f, out_f in shapes:
        fmt = TrellisFormat(
            in_f, out_f, state_bits=mc["state_bits"], bits_per_step=mc["bits_per_step"],
            tile_rows=mc["tile_rows"], tile_cols=mc["tile_cols"],
        )  # fmt: skip
        layer = TrellisLinear(fmt, device="meta")
        layer.init_low_rank(cfg.recovery.lora_r, cfg.recovery.low_rank_bits)
        bits += layer.bits_per_weight() * in_f * out_f
        weights += in_f * out_f
    assert cfg.recovery.lora_on_compressed and cfg.recovery.lora_r > 0
    assert 2.1 < bits / weights <= 2.16, bits / weights


def test_trellis_fisher_config_allocates_at_uniform_k2s_bits_inside_issue_14():
    """smollm2_trellis_lora2_fisher's budget is exactly what uniform k = 2 costs on SmolLM2-135M's linears (so the
    allocation is compared at the same bits), every SmolLM2 layer takes each of its options, and the budget plus
    the rank-2 slots stays inside issue 14's 2.16 whatever the allocation picks."""
    from lit_cb.config import load_config
    from lit_cb.quant.allocation import budget_bits

    cfg = load_config(ROOT / "configs/smollm2_trellis_lora2_fisher.yaml")
    comp = cfg.compression
    options = comp.bit_option_settings()
    assert [o.bits_per_step for o in options] == [1, 2, 3] and comp.sensitivity_weighting == "fisher"
    shapes = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]  # (in, out)
    weights = 30 * sum(i * o for i, o in shapes)
    uniform = 30 * sum(sum(options[1].layer_format(o, i).storage_bits().values()) for i, o in shapes)
    assert uniform <= budget_bits(comp.bit_budget, weights) < uniform + 30 * 7  # the budget is uniform k = 2's
    low_rank = 0.0
    for in_f, out_f in shapes:
        layer = TrellisLinear(options[1].layer_format(out_f, in_f), device="meta")
        layer.init_low_rank(cfg.recovery.lora_r, cfg.recovery.low_rank_bits)
        low_rank += (layer.bits_per_weight() - layer.fmt.bits_per_weight()) * in_f * out_f
    assert comp.bit_budget + 30 * low_rank / weights <= 2.16


@pytest.mark.parametrize("n", [48, 576, 1536])
def test_dense_rotation_is_the_factored_one(n):
    """``rotate(dense=True)`` (one matmul with R, the training path's form up to DENSE_TRAINING_ROTATION_MAX) is the
    same map as the factored transform, R orthogonal."""
    rot = InputRotation(n, seed=3)
    r = rot.matrix(torch.empty(0, dtype=torch.float64))
    assert torch.allclose(r @ r.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    x = torch.randn(4, 7, n, dtype=torch.float64)
    assert torch.allclose(rot.rotate(x, dense=True), rot.rotate(x), atol=1e-12)
    x32 = x.float()
    assert torch.allclose(rot.rotate(x32, dense=True), rot.rotate(x32), atol=1e-5)


@pytest.mark.parametrize(("dense_max", "share"), [(1024, True), (0, True), (1024, False), (0, False)])
def test_training_rotation_gives_the_float64_gradients_shared_or_not_dense_or_not(monkeypatch, dense_max, share):
    """q/k/v under autograd: three layers of one width read one input. Whether the rotation is shared and dense or
    not (the knobs bench/trellis_step_bench.py times), the outputs and the gradients of the input and of every
    layer's row scales are those of float64 dense math: y_j = (x R) W_j^T, W_j = diag(s_j) U_j."""
    from lit_cb import trellis

    monkeypatch.setattr(trellis, "DENSE_TRAINING_ROTATION_MAX", dense_max)
    monkeypatch.setattr(trellis, "SHARE_TRAINING_ROTATIONS", share)
    layers = [_layer(seed=2, bias=False) for _ in range(3)]
    for i, layer in enumerate(layers):
        layer.scales.data.mul_(1 + i)
        layer.scales.requires_grad_(True)
    rot = layers[0].rotation()
    rot.matrix(torch.empty(0))  # the dense R, built once (by a rotation of the identity) before counting
    calls = []
    original = rot.rotate
    rot.rotate = lambda t, **kw: calls.append(kw.get("dense", False)) or original(t, **kw)
    try:
        x = torch.randn(6, 48, requires_grad=True)
        weights = torch.linspace(-1, 1, 6 * 64).reshape(6, 64)
        loss = sum(((j + 1) * weights * layer(x)).sum() for j, layer in enumerate(layers))
        loss.backward()
    finally:
        rot.rotate = original
    assert calls == [dense_max >= 48] * (1 if share else 3)
    r = InputRotation(48, 2).rotate(torch.eye(48, dtype=torch.float64))
    x64 = x.detach().double().requires_grad_(True)
    scales64 = [layer.scales.detach().double().requires_grad_(True) for layer in layers]
    ref = sum(
        ((j + 1) * weights.double() * ((x64 @ r) @ (layer.unit_weight().double() * s).T)).sum()
        for j, (layer, s) in enumerate(zip(layers, scales64, strict=True))
    )
    ref.backward()
    assert torch.allclose(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-4)
    for layer, s in zip(layers, scales64, strict=True):
        assert torch.allclose(layer.scales.grad.double(), s.grad, rtol=1e-4, atol=1e-3)


def test_step_bench_smoke_times_the_four_rotation_variants_and_they_agree(tmp_path):
    """bench/trellis_step_bench.py --smoke (the H100 script on 2 CPU blocks), as a process: every variant timed, the
    scale gradients of all four the same function, the knobs left at their defaults."""
    import subprocess
    import sys

    out = tmp_path / "step.json"
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "bench/trellis_step_bench.py", "--smoke", "--out", str(out)]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert set(doc["variants"]) == {"factored", "shared", "dense", "shared_dense"} and doc["passed"]
    for row in doc["variants"].values():
        assert row["step_ms"] > 0 and row["scale_grad_rel_diff_vs_factored"] < 1e-5  # float32 on the CPU
    assert doc["profile_shared_dense"]["wall_ms"] > 0, doc["profile_shared_dense"]  # the profiler's path ran
    again = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and "exists" in again.stderr  # nothing is overwritten


def test_no_autograd_graph_outlives_a_training_step():
    """A model of trellis layers trained a step: while its forward runs, layers reading one tensor share its rotation
    (one per block input instead of one per layer); once its backward ran and the loss is gone, no rotation holds
    the step's rotated input, so no autograd graph (nor the gradient accumulators in it) reaches into the next step,
    which is what lets ``recovery.cuda_graphs`` capture the step (lit_cb/step_graphs.py)."""
    from lit_cb.compress import _set_submodule
    from tests.conftest import tiny_llama

    model = tiny_llama(num_layers=2)
    for name, mod in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]:
        layer = _layer(mod.out_features, mod.in_features, bias=False, seed=3)  # one seed: same-width layers share
        layer.scales.requires_grad_(True)
        _set_submodule(model, name, layer)
    model.train()
    calls = []
    rotations = {id(m.rotation()): m.rotation() for m in model.modules() if isinstance(m, TrellisLinear)}
    for r in rotations.values():
        r.matrix(torch.zeros(1))  # the dense R, built once (by rotating the identity) before counting
    originals = {k: r.rotate for k, r in rotations.items()}
    for k, r in rotations.items():
        r.rotate = lambda t, _orig=originals[k], **kw: calls.append(1) or _orig(t, **kw)
    try:
        ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(4))
        loss = model(input_ids=ids).logits.float().logsumexp(-1).mean()
        # per block: q/k/v share one rotation of the normed input, o its own, gate/up one, down its own
        assert len(calls) == 2 * 4
        loss.backward()
        del loss
        held = [r.last_rotated[2]() for r in rotations.values()]  # this model's (other tests' are in _ROTATIONS too)
        assert len(held) == 2 and all(t is None for t in held)
    finally:
        for k, r in rotations.items():
            r.rotate = originals[k]
