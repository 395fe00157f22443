"""bench/computed_codes_probe.py: the Viterbi walk is the exact least-squares walk (against brute force over
every valid walk), the computed values are the hash they claim to be, and a row that is exactly a walk's
values is coded without error."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_cb.quant.gptq import upper_cholesky_of_inverse

from .conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
P = load_script("bench/computed_codes_probe.py")


def _valid(walk: list[int], nbits_state: int, k: int) -> bool:
    mask = 2**nbits_state - 1
    return all(walk[t] >> k == walk[t - 1] & (mask >> k) for t in range(1, len(walk)))


@pytest.mark.parametrize(("nbits_state", "k", "length"), [(4, 2, 4), (5, 1, 6), (3, 2, 3)])
def test_viterbi_finds_the_least_squares_walk_of_brute_force(nbits_state, k, length):
    gen = torch.Generator().manual_seed(nbits_state * 10 + k)
    values = torch.randn(2**nbits_state, generator=gen)
    x = torch.randn(4, length, generator=gen)
    walks = P.viterbi(x, values, k)
    mask = 2**nbits_state - 1
    for n in range(x.shape[0]):
        best = min(
            sum((float(x[n, t]) - float(values[s])) ** 2 for t, s in enumerate(walk))
            for walk in (
                list(itertools.accumulate(bits, lambda s, b: ((s << k) | b) & mask, initial=s0))
                for s0 in range(2**nbits_state)
                for bits in itertools.product(range(2**k), repeat=length - 1)
            )
        )
        walk = walks[n].tolist()
        assert _valid(walk, nbits_state, k), walk
        assert sum((float(x[n, t]) - float(values[s])) ** 2 for t, s in enumerate(walk)) == pytest.approx(
            best, rel=1e-6
        )


def test_weighted_viterbi_finds_the_least_weighted_squares_walk():
    nbits_state, k, length = 4, 2, 4
    gen = torch.Generator().manual_seed(9)
    values = torch.randn(16, generator=gen)
    x = torch.randn(3, length, generator=gen)
    d = torch.tensor([0.1, 5.0, 1.0, 0.3])
    walks = P.viterbi(x, values, k, weights=d)
    for n in range(3):

        def cost(walk, n=n):
            return sum(float(d[t]) * (float(x[n, t]) - float(values[s])) ** 2 for t, s in enumerate(walk))

        best = min(
            cost(list(itertools.accumulate(bits, lambda s, b: ((s << k) | b) & 15, initial=s0)))
            for s0 in range(16)
            for bits in itertools.product(range(4), repeat=length - 1)
        )
        assert _valid(walks[n].tolist(), nbits_state, k)
        assert cost(walks[n].tolist()) == pytest.approx(best, rel=1e-6)


def test_a_walk_that_must_go_on_from_a_state_is_the_best_of_those_walks():
    nbits_state, k, length = 4, 2, 3
    gen = torch.Generator().manual_seed(5)
    values = torch.randn(16, generator=gen)
    x = torch.randn(3, length, generator=gen)
    prev = torch.tensor([0, 7, 15])
    walks = P.viterbi(x, values, k, prev)
    for n in range(3):
        best = min(
            sum((float(x[n, t]) - float(values[s])) ** 2 for t, s in enumerate(walk[1:]))
            for walk in (
                list(itertools.accumulate(bits, lambda s, b: ((s << k) | b) & 15, initial=int(prev[n])))
                for bits in itertools.product(range(4), repeat=length)
            )
        )
        walk = [int(prev[n]), *walks[n].tolist()]
        assert _valid(walk, nbits_state, k), walk
        got = sum((float(x[n, t]) - float(values[s])) ** 2 for t, s in enumerate(walk[1:]))
        assert got == pytest.approx(best, rel=1e-6)


def test_block_ldlq_errors_add_up_to_the_hessian_weighted_error_in_float64():
    """With H^-1 = U^T U (H damped by 1% of its mean diagonal), the blocks' ||E U_BB^-1||^2 sum to
    tr(dW H dW^T): the feedback is right, whatever the coder; and it beats coding without feedback here."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(12, 30, generator=gen, dtype=torch.float64)
    hessian = a @ a.T / 30
    target = torch.randn(5, 12, generator=gen, dtype=torch.float64)
    coded, parts = P.block_ldlq(target, upper_cholesky_of_inverse(hessian, 0.01), 4, lambda x: (x * 2).round() / 2)
    damped = hessian + 0.01 * hessian.diagonal().mean() * torch.eye(12, dtype=torch.float64)
    d = target - coded
    assert sum(parts) == pytest.approx(float(torch.trace(d @ damped @ d.T)), rel=1e-10)
    d0 = target - (target * 2).round() / 2
    assert sum(parts) < float(torch.trace(d0 @ damped @ d0.T))


def test_computed_values_are_the_byte_sum_hash():
    values = P.computed_values(12)
    for s in (0, 1, 77, 4095):
        x = (P.HASH_MUL * s + P.HASH_ADD) % 2**32
        total = sum((x >> (8 * i)) & 0xFF for i in range(4))
        assert float(values[s]) == pytest.approx((total - 510) / ((4 * (256**2 - 1) / 12) ** 0.5), abs=1e-6)
    assert abs(float(values.mean())) < 0.05 and 0.9 < float(values.std()) < 1.1  # close to N(0, 1)


def test_a_walk_is_found_again_and_gaussian_rows_land_between_the_bound_and_scalar_rounding():
    gen = torch.Generator().manual_seed(3)
    values = P.table_values(6, seed=1)
    bits = torch.randint(0, 4, (5, 39), generator=gen)
    walks = torch.empty(5, 40, dtype=torch.int64)
    walks[:, 0] = torch.randint(0, 64, (5,), generator=gen)
    for t in range(1, 40):
        walks[:, t] = ((walks[:, t - 1] << 2) | bits[:, t - 1]) & 63
    assert torch.equal(P.viterbi(values[walks], values, 2), walks)
    # i.i.d. N(0, 1) rows: no code of R bits per weight beats D(R) = 2**(-2R) (R counts the first state's and
    # the scale's bits: 2 + (10 - 2 + 16) / 512), and the trellis must beat 2-bit Lloyd-Max scalar rounding (0.1175)
    x = torch.randn(8, 512, generator=gen)
    err = P.relative_error(x, P.trellis_quantize(x, P.computed_values(10), 2))
    rate = 2 + (10 - 2 + 16) / 512
    assert 2 ** (-2 * rate) < err < 0.1175


def test_bits_per_weight_add_up():
    # 2 bits per weight + (L - k) bits for each row's first state + an fp16 scale per row (+ a table if stored)
    assert P.bits_per_weight("trellis_L6", 5, 40, 6, 2) == pytest.approx((2 * 200 + 4 * 5 + 16 * 5) / 200)
    assert P.bits_per_weight("trellis_L6_table", 5, 40, 6, 2) == pytest.approx((2 * 200 + 20 + 80 + 16 * 64) / 200)
    # the Hessian-aware variant: one first state per 256-weight tile
    assert P.bits_per_weight("trellis_L10_ldlq", 64, 576, 10, 2) == pytest.approx(2 + (8 * 144 + 16 * 64) / (64 * 576))
    assert P.bits_per_weight("kmeans_g4_b8", 5, 40, 0, 2) == pytest.approx((400 + 256 * 4 * 16 + 80) / 200)


def test_bad_arguments_are_refused_before_any_work(tmp_path):
    out = tmp_path / "r.json"
    out.write_text("{}")
    cmd = [sys.executable, "bench/computed_codes_probe.py", "--out", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and "exists" in res.stderr and out.read_text() == "{}"
    res = subprocess.run(
        [*cmd[:-1], str(tmp_path / "n.json"), "--state-bits", "2"], cwd=ROOT, capture_output=True, text=True
    )
    assert res.returncode == 2 and "need 1 <= k < L <= 16" in res.stderr
    res = subprocess.run(
        [*cmd[:-1], str(tmp_path / "n.json"), "--ppl-blocks", "3"], cwd=ROOT, capture_output=True, text=True
    )
    assert res.returncode == 2 and "needs --hessian CONFIG" in res.stderr


def test_fake_quantize_blocks_sees_float64_hessians_and_changes_only_the_blocks_asked():
    """Block 0's q_proj gets H = X^T X / tokens of its true input (the normed embeddings, float64 here);
    block 1's H comes through block 0 as quantized; block 2 is left alone; an identity quantizer keeps the logits."""
    from lit_cb.models import random_smollm2

    model = random_smollm2(num_layers=3, seed=1).eval()
    windows = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=windows).logits
    seen: dict[str, torch.Tensor] = {}

    def record(name, w, h):
        seen[name] = h
        return w

    P.fake_quantize_blocks(model, windows, 2, record)
    with torch.no_grad():
        assert torch.equal(model(input_ids=windows).logits, before)
    assert sorted(seen) == sorted(
        f"{i}.{n}"
        for i in (0, 1)
        for n in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    )
    block0 = model.model.layers[0]
    x = block0.input_layernorm(model.model.embed_tokens(windows)).double().reshape(-1, 576)
    assert torch.allclose(seen["0.self_attn.q_proj"].double(), x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)

    # zeroing block 0's down_proj changes block 1's inputs, so its H; block 2 keeps its weights
    model2 = random_smollm2(num_layers=3, seed=1).eval()
    w2 = model2.model.layers[2].mlp.down_proj.weight.clone()
    seen2: dict[str, torch.Tensor] = {}

    def zero_down(name, w, h):
        seen2[name] = h
        return torch.zeros_like(w) if name == "0.mlp.down_proj" else w

    P.fake_quantize_blocks(model2, windows, 2, zero_down)
    assert torch.equal(model2.model.layers[0].mlp.down_proj.weight, torch.zeros_like(w2))
    assert torch.equal(model2.model.layers[2].mlp.down_proj.weight, w2)
    assert not torch.allclose(seen2["1.self_attn.q_proj"], seen["1.self_attn.q_proj"])
    assert torch.allclose(seen2["0.self_attn.q_proj"], seen["0.self_attn.q_proj"])
