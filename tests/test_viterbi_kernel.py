"""The Viterbi kernel (lit_cb.kernels.viterbi) against the PyTorch search lit_cb.trellis.viterbi, on CPU under the
Triton interpreter (CI has no GPU; the GPU check and timings are in bench/viterbi_bench.py).

What must agree: each row's objective ``sum_t d_t (x_t - values[s_t])**2`` (to rtol 1e-5), the walks themselves
where no two costs tie (random ``x``), and every returned walk must be a trellis walk."""

from __future__ import annotations

import pytest
import torch

from lit_cb.kernels.dispatch import interpreter_on_cpu
from lit_cb.trellis import computed_values, viterbi

from .conftest import interpreted_module

KV = interpreted_module("lit_cb.kernels.viterbi", "_viterbi_kernel")


def _objective(x: torch.Tensor, values: torch.Tensor, walks: torch.Tensor, d: torch.Tensor | None) -> torch.Tensor:
    err = (x.double() - values.double()[walks]) ** 2
    return (err if d is None else err * d.double()).sum(dim=1)


def _assert_walks(walks: torch.Tensor, state_bits: int, k: int) -> None:
    assert walks.dtype == torch.int64
    assert bool((walks >= 0).all()) and bool((walks < 2**state_bits).all())
    assert torch.equal(walks[:, 1:] >> k, walks[:, :-1] & (2 ** (state_bits - k) - 1)), "not a trellis walk"


def _run(x, values, k, prev=None, weights=None):
    with interpreter_on_cpu():
        return KV.viterbi_walks(x, values, k, prev, weights)


@pytest.mark.parametrize(
    ("state_bits", "k", "t_len", "n", "weighted"),
    [
        (6, 1, 20, 3, False),
        (6, 2, 33, 4, True),
        (6, 3, 17, 2, False),
        (8, 1, 40, 3, True),
        (8, 2, 64, 5, False),
        (8, 4, 24, 3, True),
        (12, 2, 256, 2, True),  # the quantizer's default: 4096 states, a 32 x 8 tile
        (6, 2, 1, 3, True),  # one step: the first state alone
        (6, 2, 2, 1, False),
    ],
)
def test_kernel_finds_the_reference_walks(state_bits, k, t_len, n, weighted):
    gen = torch.Generator().manual_seed(100 * state_bits + 10 * k + t_len)
    values = computed_values(state_bits)
    x = torch.randn(n, t_len, generator=gen) * 1.2
    d = torch.rand(t_len, generator=gen) * 2 + 0.1 if weighted else None
    ref = viterbi(x, values, k, weights=d)
    got = _run(x, values, k, weights=d)
    _assert_walks(got, state_bits, k)
    torch.testing.assert_close(_objective(x, values, got, d), _objective(x, values, ref, d), rtol=1e-5, atol=0)
    assert torch.equal(got, ref)  # random x: no exact ties, so the optimum is unique


def test_ties_break_to_an_optimal_walk():
    """x on a trellis walk exactly: cost 0 is reached, and the hashed values repeat, so several walks tie at 0
    (and the kernel may pick another one than the reference); the objective must still be the optimum."""
    state_bits, k = 8, 2
    values = computed_values(state_bits)
    gen = torch.Generator().manual_seed(7)
    first = torch.randint(0, 2**state_bits, (4,), generator=gen)
    walk = [first]
    for _ in range(29):
        walk.append(((walk[-1] << k) | torch.randint(0, 2**k, (4,), generator=gen)) & (2**state_bits - 1))
    x = values[torch.stack(walk, dim=1)]
    x[2] = 0.0  # a constant row: many equal-cost walks
    got = _run(x, values, k)
    ref = viterbi(x, values, k)
    _assert_walks(got, state_bits, k)
    torch.testing.assert_close(_objective(x, values, got, None), _objective(x, values, ref, None), rtol=1e-5, atol=1e-6)
    assert float(_objective(x, values, got, None)[[0, 1, 3]].max()) == 0.0


def test_strided_x_double_values_and_an_empty_batch():
    state_bits, k = 6, 2
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(24, 5, generator=gen).T  # [5, 24], not contiguous
    values = computed_values(state_bits).double()  # cast to float32, as the reference does
    d = torch.rand(24, generator=gen, dtype=torch.float64) + 0.5
    assert torch.equal(_run(x, values, k, weights=d), viterbi(x, values, k, weights=d))
    empty = _run(torch.empty(0, 9), values, k)
    assert empty.shape == (0, 9) and empty.dtype == torch.int64


def test_supports_only_float32_on_a_kernel_device():
    x = torch.randn(2, 8)
    assert not KV.supports(x)  # CPU outside interpreter_on_cpu: the reference's job
    with interpreter_on_cpu():
        assert KV.supports(x)
        assert not KV.supports(x.double())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prev": torch.zeros(2, dtype=torch.int64)}, "prev=None"),
        ({"x": torch.randn(2, 4, 3)}, r"\[N, T\]"),
        ({"x": torch.randn(2, 8).double()}, "float32"),
        ({"x": torch.randn(2, 0)}, "T >= 1"),
        ({"values": torch.randn(48)}, "2\\*\\*L"),
        ({"values": torch.randn(2**17)}, "2\\*\\*L"),
        ({"values": torch.randn(8, 8)}, "1-D"),
        ({"k": 4}, "k dividing L"),
        ({"k": 6}, "k dividing L"),
        ({"k": 0}, "k dividing L"),
        ({"k": 2.0}, "k dividing L"),
        ({"weights": torch.ones(7)}, r"\[T\]"),
    ],
)
def test_bad_inputs_raise(kwargs, match):
    call = {"x": torch.randn(2, 8), "values": computed_values(6), "k": 2} | kwargs
    with pytest.raises(ValueError, match=match):
        _run(**call)


def test_refuses_cpu_tensors_outside_the_interpreter_context():
    with pytest.raises(ValueError, match="not supported"):
        KV.viterbi_walks(torch.randn(2, 8), computed_values(6), 2)


def test_quantize_trellis_takes_the_kernel_where_it_runs_and_codes_as_the_reference(monkeypatch):
    """lit_cb.quant.trellis.search_walks sends the row-scale probes and the block-LDLQ walks (with column weights)
    to the kernel where it runs (here the interpreter): the same codes and scales as the PyTorch search."""
    import lit_cb.quant.trellis as QT
    from lit_cb.configs.trellis import TrellisConfig

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 32, generator=gen)
    a = torch.randn(64, 32, generator=gen)
    hessian = a.T @ a / 64
    config = TrellisConfig(state_bits=6, bits_per_step=2, tile_rows=4, tile_cols=8)
    ref = QT.quantize_trellis(weight, hessian, config)  # CPU outside the interpreter context: PyTorch
    calls = []
    original = KV.viterbi_walks
    monkeypatch.setattr(KV, "viterbi_walks", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    with interpreter_on_cpu():
        got = QT.quantize_trellis(weight, hessian, config)
    assert len(calls) == len(QT.SCALE_MULTIPLIERS) + 32 // 8
    assert torch.equal(got.codes, ref.codes)
    assert torch.equal(got.scales, ref.scales)
