"""AQLM: beam search, objective, initialisation vs full optimisation, format and config checks."""

from __future__ import annotations

import itertools

import pytest
import torch

from lit_cb.layers import CodebookLinear
from lit_cb.quant import registry
from lit_cb.quant.aqlm import (
    AQLM_PRESETS,
    AQLMConfig,
    aqlm_quantize,
    beam_search_all,
    beam_search_codes,
    kmeans,
    layer_objective,
    quantize_aqlm,
    reconstruct,
    residual_kmeans_init,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small ops: one thread avoids OpenMP oversubscription on shared CPUs (much faster there)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _correlated_inputs(n: int, dim: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Activations with correlated channels and uneven scales, so H couples the input groups."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=gen, dtype=torch.float64) / dim**0.5 + torch.eye(dim, dtype=torch.float64)
    col_scale = torch.rand(dim, generator=gen, dtype=torch.float64) * 2 + 0.1
    return ((torch.randn(n, dim, generator=gen, dtype=torch.float64) @ mix) * col_scale).to(dtype)


def _random_problem(
    seed: int, out: int, inp: int, g: int, og: int, num_codebooks: int, nbits: int, dtype=torch.float32
) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = _correlated_inputs(4 * inp, inp, seed, dtype)
    hessian = x.T @ x / x.shape[0]
    weight = torch.randn(out, inp, generator=gen, dtype=dtype)
    codebooks = torch.randn(num_codebooks, 2**nbits, og, g, generator=gen, dtype=dtype) * 0.7
    scales = torch.rand(out // og, generator=gen, dtype=dtype) + 0.5
    codes = torch.randint(2**nbits, (out // og, inp // g, num_codebooks), generator=gen)
    return weight, hessian, codes, codebooks, scales


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("beam_size", [1, 4])
def test_beam_search_never_worse_than_start(seed: int, beam_size: int) -> None:
    og = 2 if seed == 3 else 1
    weight, hessian, codes, codebooks, scales = _random_problem(seed, 24, 32, 4, og, 2, 4)
    start = layer_objective(weight, reconstruct(codes, codebooks, scales), hessian)
    start_rows = (
        (weight - reconstruct(codes, codebooks, scales)) @ hessian * (weight - reconstruct(codes, codebooks, scales))
    ).sum(-1)
    for m in range(2):
        new_codes = beam_search_codes(weight, hessian, codes, codebooks, scales, m, beam_size)
        other = [c for c in range(2) if c != m]
        assert torch.equal(new_codes[..., other], codes[..., other]), "only the searched codebook may change"
        delta = weight - reconstruct(new_codes, codebooks, scales)
        rows = ((delta @ hessian) * delta).sum(-1)
        assert bool((rows.view(-1, og).sum(-1) <= start_rows.view(-1, og).sum(-1) * (1 + 1e-6) + 1e-6).all())
    new_codes = beam_search_all(weight, hessian, codes, codebooks, scales, beam_size)
    end = layer_objective(weight, reconstruct(new_codes, codebooks, scales), hessian)
    assert float(end) <= float(start)
    # Random starting codes are far from optimal, so a working search must find a real gain.
    assert float(end) < 0.7 * float(start)


@pytest.mark.parametrize("og", [1, 2])
@pytest.mark.parametrize("seed", [0, 1])
def test_beam_search_single_codebook_finds_exhaustive_optimum(og: int, seed: int) -> None:
    # 2 output groups x 2 input groups, B=3: with beam >= 8 the search keeps every prefix,
    # so it must reach the optimum over all 8**4 code combinations.
    out, inp, g, nbits = 2 * og, 4, 2, 3
    weight, hessian, codes, codebooks, scales = _random_problem(seed, out, inp, g, og, 1, nbits, torch.float64)
    found = beam_search_codes(weight, hessian, codes, codebooks, scales, 0, beam_size=8)
    found_obj = float(layer_objective(weight, reconstruct(found, codebooks, scales), hessian))
    best = min(
        float(layer_objective(weight, reconstruct(torch.tensor(c).view(2, 2, 1), codebooks, scales), hessian))
        for c in itertools.product(range(2**nbits), repeat=4)
    )
    start = float(layer_objective(weight, reconstruct(codes, codebooks, scales), hessian))
    assert found_obj == pytest.approx(best, rel=1e-9, abs=1e-12)
    assert best < start


def test_beam_search_row_chunks_do_not_change_result() -> None:
    weight, hessian, codes, codebooks, scales = _random_problem(5, 24, 32, 4, 1, 2, 4, torch.float64)
    whole = beam_search_codes(weight, hessian, codes, codebooks, scales, 1, 4, max_chunk_elements=2**26)
    chunked = beam_search_codes(weight, hessian, codes, codebooks, scales, 1, 4, max_chunk_elements=4 * 32 * 5)
    assert torch.equal(whole, chunked)


def test_objective_through_hessian_equals_direct_output_error() -> None:
    n, out, inp = 300, 12, 16
    x = _correlated_inputs(n, inp, 7, torch.float64)
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(out, inp, generator=gen, dtype=torch.float64)
    approx = weight + 0.1 * torch.randn(out, inp, generator=gen, dtype=torch.float64)
    direct = ((x @ weight.T - x @ approx.T) ** 2).sum() / n
    via_h = layer_objective(weight, approx, x.T @ x / n)
    assert float(via_h) == pytest.approx(float(direct), rel=1e-10)


@pytest.mark.parametrize("weighted", [True, False])
def test_full_quantization_beats_residual_kmeans_init(weighted: bool) -> None:
    x = _correlated_inputs(512, 64, 11)
    hessian = x.T @ x / x.shape[0]
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(11)) * 0.05
    config = AQLMConfig(
        num_codebooks=2,
        nbits_per_codebook=4,
        in_group_size=4,
        beam_size=4,
        max_epochs=6,
        codebook_steps=50,
        relative_tol=0.0,
        seed=3,
        hessian_weighted_init=weighted,
    )
    init_codes, init_books, init_scales = residual_kmeans_init(
        weight, config, torch.Generator().manual_seed(3), hessian if weighted else None
    )
    init_obj = float(layer_objective(weight, reconstruct(init_codes, init_books, init_scales), hessian))
    result = aqlm_quantize(weight, hessian, config)
    assert result.init_objective == pytest.approx(init_obj, rel=1e-5)
    final = float(layer_objective(weight, reconstruct(result.codes, result.codebooks, result.scales), hessian))
    assert final == pytest.approx(result.final_objective, rel=1e-4)
    assert all(b <= a * (1 + 1e-6) for a, b in itertools.pairwise(result.history[1:]))
    assert final < 0.8 * init_obj
    assert result.relative_error < 1.0


def test_quantize_aqlm_builds_codebook_linear() -> None:
    x = _correlated_inputs(256, 32, 4)
    hessian = x.T @ x / x.shape[0]
    gen = torch.Generator().manual_seed(4)
    weight, bias = torch.randn(16, 32, generator=gen), torch.randn(16, generator=gen)
    config = AQLMConfig(num_codebooks=2, nbits_per_codebook=3, in_group_size=4, max_epochs=2, codebook_steps=10)
    assert registry._REGISTRY[AQLMConfig] is quantize_aqlm
    layer = quantize_aqlm(weight, hessian, config, bias)
    assert isinstance(layer, CodebookLinear)
    assert tuple(layer.codes.shape) == (16, 8, 2) and layer.codes.dtype == torch.uint8
    assert not layer.codebooks.requires_grad and not layer.scales.requires_grad
    rel = float(layer_objective(weight, layer.dequantize().float(), hessian)) / float(
        layer_objective(weight, torch.zeros_like(weight), hessian)
    )
    assert rel == pytest.approx(layer.aqlm_stats["relative_error"], rel=1e-2)
    out = layer(x[:5].to(layer.codebooks.dtype))
    ref = x[:5] @ layer.dequantize().float().T + bias
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


def test_bits_per_weight_2x8_g8_on_576x576() -> None:
    fmt = AQLM_PRESETS["2x8_g8"].layer_format(576, 576)
    # codes: 2 x 8 bits per 8 weights = 2 bits; codebooks 2 x 256 x 8 fp16; one fp16 scale per row.
    by_hand = 2 + (2 * 256 * 8 * 16 + 576 * 16) / (576 * 576)
    assert fmt.bits_per_weight() == pytest.approx(by_hand, rel=1e-12)
    assert 2.2 < by_hand < 2.25
    assert AQLM_PRESETS["1x8_g8"].layer_format(4096, 4096).bits_per_weight() == pytest.approx(
        1 + (256 * 8 * 16 + 4096 * 16) / 4096**2
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_codebooks", 0),
        ("nbits_per_codebook", 17),
        ("in_group_size", 3),
        ("out_group_size", 5),
        ("beam_size", 0),
        ("max_epochs", -1),
        ("relative_tol", -0.1),
        ("codebook_lr", 0.0),
        ("codebook_steps", -2),
        ("init_kmeans_iters", -1),
        ("per_row_scales", 1),
        ("hessian_weighted_init", "yes"),
        ("damp", float("nan")),
        ("seed", -1),
        ("max_chunk_elements", 0),
    ],
)
def test_bad_config_raises_naming_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        AQLMConfig(**{field: value})


def test_config_dict_round_trip_and_unknown_field() -> None:
    config = AQLMConfig(num_codebooks=4, beam_size=2, relative_tol=0.05)
    assert AQLMConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="beam_width"):
        AQLMConfig.from_dict({"beam_width": 3})
    assert set(AQLM_PRESETS) == {"1x16_g8", "2x8_g8", "1x8_g8", "4x8_g8"}
    with pytest.raises(ValueError, match="in_features"):
        aqlm_quantize(torch.zeros(8, 12), torch.eye(12), AQLMConfig(in_group_size=8))


def test_weighted_kmeans_assigns_by_weighted_distance() -> None:
    gen = torch.Generator().manual_seed(8)
    points = torch.randn(200, 4, generator=gen, dtype=torch.float64)
    weights = torch.rand(200, 4, generator=gen, dtype=torch.float64) * 3
    centroids, assign = kmeans(points, 8, 5, torch.Generator().manual_seed(0), 2**20, weights)
    brute = ((points[:, None, :] - centroids[None]) ** 2 * weights[:, None, :]).sum(-1).argmin(1)  # [N]
    assert torch.equal(assign, brute)
    # Unit weights must reproduce plain k-means exactly.
    plain, plain_assign = kmeans(points, 8, 5, torch.Generator().manual_seed(0), 2**20)
    same, same_assign = kmeans(points, 8, 5, torch.Generator().manual_seed(0), 2**20, torch.ones_like(points))
    torch.testing.assert_close(plain, same)
    assert torch.equal(plain_assign, same_assign)


def _reference_beam_search(weight, hessian, codes, codebooks, scales, m: int, beam_size: int) -> torch.Tensor:
    """The beam search by its definition, in float64 with every hypothesis scored by the full objective: per
    output group, visit the input groups in order; every hypothesis (the searched codebook's codes of the groups
    visited so far, the rest as given) grows by every codeword; the ``beam_size`` lowest objectives stay. The
    best final hypothesis, or the given codes where it is not better (the search never makes a group worse)."""
    num_out, num_in, _ = codes.shape
    og = codebooks.shape[2]
    out = codes.clone()
    for o in range(num_out):
        rows = slice(o * og, (o + 1) * og)

        def objective(col: torch.Tensor, o: int = o, rows: slice = rows) -> float:
            trial = codes[o : o + 1].clone()
            trial[0, :, m] = col
            delta = weight[rows].double() - reconstruct(trial, codebooks.double(), scales[o : o + 1].double())
            return float(((delta @ hessian.double()) * delta).sum())

        beams = [codes[o, :, m].clone()]
        for i in range(num_in):
            children = []
            for parent in beams:
                for k in range(codebooks.shape[1]):
                    child = parent.clone()
                    child[i] = k
                    children.append((objective(child), child))
            children.sort(key=lambda c: c[0])
            beams = [c for _, c in children[:beam_size]]
        if objective(beams[0]) < objective(codes[o, :, m]):
            out[o, :, m] = beams[0]
    return out


@pytest.mark.parametrize(("seed", "og", "beam_size", "lazy_block"), [(0, 1, 1, 1), (1, 1, 3, 3), (2, 2, 4, 8),
                                                                     (3, 1, 8, 5), (4, 2, 2, 32)])  # fmt: skip
def test_beam_search_matches_its_definition(seed: int, og: int, beam_size: int, lazy_block: int) -> None:
    """The incremental search (rank-g updates of R H, applied lazily a block of groups at a time) chooses what
    scoring every hypothesis by the whole objective chooses, in float64; for every block size, one that does
    not divide the 8 input groups and one larger than all of them included."""
    weight, hessian, codes, codebooks, scales = _random_problem(seed, 4 * og, 32, 4, og, 2, 3, torch.float64)
    for m in range(2):
        got = beam_search_codes(weight, hessian, codes, codebooks, scales, m, beam_size, lazy_block=lazy_block)
        assert torch.equal(got, _reference_beam_search(weight, hessian, codes, codebooks, scales, m, beam_size))


def test_beam_search_bench_runs_and_records(tmp_path) -> None:
    """bench/beam_search_bench.py (the GPU timing of the batched updates) on a toy shape, as a process: both
    timings and objectives recorded, the two objectives close, tensor ops per step counted; --out never
    overwrites."""
    import json
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    out = tmp_path / "beam.json"
    cmd = [sys.executable, "bench/beam_search_bench.py", "--shapes", "16x64,8x128", "--ops", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert {"device", "versions", "date", "command", "rows"} <= set(doc) and len(doc["rows"]) == 2
    for row in doc["rows"]:
        assert row["per_group_s"] > 0 and row["batched_s"] > 0
        assert row["batched_objective"] == pytest.approx(row["per_group_objective"], rel=1e-3)
    assert 0 < doc["ops_per_step_64x512"]["batched"] < 40
    again = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert again.returncode != 0 and "exists" in again.stderr


def test_graphed_beam_search_plumbing_matches_eager(monkeypatch) -> None:
    """LIT_CB_GRAPH_BEAM's path (lit_cb/quant/beam_graphs.py) with an eager stand-in for the CUDA capture: every
    call of one shape reuses one capture (its static inputs refilled) and returns what the eager search returns;
    another shape gets its own; the least recently used goes past MAX_GRAPHS; state past MAX_STATE_ELEMENTS runs
    eagerly. (The capture itself needs a GPU: bench/beam_search_bench.py --graphs.)"""
    from lit_cb.quant import beam_graphs

    captures = []

    def eager_capture(fn, static):
        captures.append(tuple(t.shape for t in static))
        out = fn(*static)
        return (lambda: out.copy_(fn(*static))), out

    expected = {}
    problems = {seed: _random_problem(seed, 12, 32, 4, 1, 2, 4) for seed in range(3)}
    problems[3] = _random_problem(3, 8, 16, 4, 1, 2, 4)
    for seed, prob in problems.items():
        expected[seed] = [beam_search_codes(*prob, m, 4) for m in range(2)]
    wide = _random_problem(5, 10, 32, 4, 1, 2, 4)  # a third shape, for the eviction below
    expected_wide = beam_search_codes(*wide, 0, 4)
    monkeypatch.setattr(beam_graphs, "enabled", lambda like: True)
    monkeypatch.setattr(beam_graphs, "cuda_capture", eager_capture)
    monkeypatch.setattr(beam_graphs, "_GRAPHS", type(beam_graphs._GRAPHS)())
    for seed, prob in problems.items():
        for m in range(2):
            assert torch.equal(beam_search_codes(*prob, m, 4), expected[seed][m]), (seed, m)
    assert len(captures) == 2 and len(beam_graphs._GRAPHS) == 2  # one per shape, reused across data and codebooks
    monkeypatch.setattr(beam_graphs, "MAX_GRAPHS", 1)
    assert torch.equal(beam_search_codes(*wide, 0, 4), expected_wide)  # its capture evicts the other two
    assert len(beam_graphs._GRAPHS) == 1 and len(captures) == 3
    assert torch.equal(beam_search_codes(*problems[3], 0, 4), expected[3][0])
    assert len(captures) == 4  # the 8 x 16 one had been evicted: captured again
    monkeypatch.setattr(beam_graphs, "MAX_STATE_ELEMENTS", 10)
    assert torch.equal(beam_search_codes(*problems[1], 1, 4), expected[1][1]) and len(captures) == 4  # eager
