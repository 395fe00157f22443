"""Mixed precision by sensitivity (compression.bit_budget): the allocation against brute force,
the budget counted by the one counting function, better than uniform at the same bits, resume,
and bad input refused before any work."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
from pathlib import Path

import pytest
import torch

from lit_cb import sensitivity
from lit_cb.compress import CompressionConfig, bits_per_weight, compress_model
from lit_cb.layers import CodebookLinear
from lit_cb.quant.allocation import LayerChoices, allocate, budget_bits, lagrangian_lower_bound

from .conftest import tiny_llama

BASE = {"in_group_size": 4, "nbits": 4, "kmeans_iters": 3, "codebook_update_steps": 2}
OPTIONS = [{"nbits": 3}, {"nbits": 4}, {"nbits": 5}, {"nbits": 6}]


def _model():
    """One block (7 linears) whose MLP weights are clustered (see :func:`_clustered_mlps`)."""
    model = tiny_llama(num_layers=1)
    _clustered_mlps(model)
    return model


def _windows(n=4, seq=12, vocab=512, seed=0):
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def _brute_force(layers: list[LayerChoices], cap: int) -> float:
    best = math.inf
    for pick in itertools.product(*(range(len(lay.costs)) for lay in layers)):
        if sum(lay.costs[j] for lay, j in zip(layers, pick, strict=True)) <= cap:
            best = min(best, sum(lay.errors[j] for lay, j in zip(layers, pick, strict=True)))
    return best


# -- the allocation itself ---------------------------------------------------------------------------


def test_hand_checked_instance():
    # Two layers of 10 weights; budget 3 bits/weight = 60 bits. a: 20 bits err 5, 40 bits err 1;
    # b: 20 bits err 4, 40 bits err 3. Upgrading a saves 4, b only 1: a takes 40, b 20 (err 5).
    layers = [LayerChoices("a", 10, (20, 40), (5.0, 1.0)), LayerChoices("b", 10, (20, 40), (4.0, 3.0))]
    alloc = allocate(layers, 3.0)
    assert alloc.choice == {"a": 1, "b": 0} and alloc.total_bits == 60 and alloc.error == 5.0
    assert alloc.status == "optimal" and alloc.bits_per_weight <= 3.0
    # 4 bits/weight: both top options fit
    assert allocate(layers, 4.0).choice == {"a": 1, "b": 1} and allocate(layers, 4.0).status == "unconstrained"
    # c's middle option lies off its convex hull (a Lagrangian sweep never picks it); 20 weights.
    layers = [LayerChoices("c", 10, (0, 10, 20), (10.0, 9.0, 0.0)), LayerChoices("d", 10, (0, 10), (5.0, 0.0))]
    assert allocate(layers, 0.5).choice == {"c": 0, "d": 1}  # 10 bits: d's step saves 5 > c's 1
    assert allocate(layers, 1.0).choice == {"c": 2, "d": 0}  # 20 bits: c's two steps save 10 > 1 + 5
    assert allocate(layers, 1.4).choice == {"c": 2, "d": 0}  # 28 bits: not enough for both


def test_allocation_is_optimal_against_brute_force():
    rng = random.Random(0)
    for trial in range(150):
        layers = []
        for i in range(rng.randint(1, 5)):
            k = rng.randint(1, 4)
            step = rng.choice([1, 3, 8])
            costs = tuple(step * rng.randint(0, 12) + rng.choice([0, 0, 5]) for _ in range(k))
            errors = tuple(rng.choice([rng.random(), float(rng.randint(0, 3))]) for _ in range(k))
            layers.append(LayerChoices(f"l{i}", rng.randint(1, 6), costs, errors))
        n = sum(lay.numel for lay in layers)
        lo, hi = sum(min(lay.costs) for lay in layers), sum(max(lay.costs) for lay in layers)
        budget = rng.uniform(lo, hi + 5) / n
        alloc = allocate(layers, budget)
        cap = budget_bits(budget, n)
        expected = _brute_force(layers, cap)
        assert alloc.total_bits <= cap and alloc.total_bits / n <= budget, trial
        assert alloc.error == pytest.approx(expected, abs=1e-12), (trial, layers, budget)
        assert lagrangian_lower_bound(layers, cap) <= expected + 1e-9
        # The coarse DP (costs rounded up, then a greedy fill) stays within the budget and bound.
        coarse = allocate(layers, budget, max_states=2)
        assert coarse.total_bits <= cap and coarse.error >= expected - 1e-12
        assert coarse.lower_bound <= coarse.error + 1e-9


def test_budget_below_the_cheapest_allocation_is_refused():
    layers = [LayerChoices("a", 10, (20, 40), (5.0, 1.0))]
    with pytest.raises(ValueError, match=r"bit budget 1.5 bits/weight is below the cheapest allocation.*2.0000"):
        allocate(layers, 1.5)
    assert budget_bits(2.16, 100) == 216 and budget_bits(0.1, 3) == 0  # exact, never rounded up


# -- on the tiny model -----------------------------------------------------------------------------------


def _clustered_mlps(model, codebook_size: int = 8, group: int = 4) -> None:
    """Make every MLP weight exactly ``codebook_size`` distinct group vectors, each equally often in
    every row (so every row has the same RMS and the row scales keep the vectors identical):
    ``nbits=3`` already reproduces them, more bits buy these layers nothing."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and ".mlp." in name:
                out_f, in_f = m.weight.shape
                centroids = torch.randn(codebook_size, group, generator=gen) * 0.05
                per_row = in_f // group
                codes = torch.arange(per_row) % codebook_size
                rows = torch.stack([codes[torch.randperm(per_row, generator=gen)] for _ in range(out_f)])
                m.weight.copy_(centroids[rows].reshape(out_f, in_f))


def _storage_bits(model) -> tuple[int, int]:
    layers = [m for m in model.modules() if isinstance(m, CodebookLinear)]
    bits = sum(sum(m.fmt.storage_bits().values()) for m in layers)
    return bits, sum(m.in_features * m.out_features for m in layers)


@pytest.fixture(scope="module")
def uniform_and_mixed(tmp_path_factory):
    """The same clustered model compressed uniformly at nbits=4 and by sensitivity at the same bits."""
    windows = _windows()
    uniform = _model()
    rep_u = compress_model(
        uniform, windows, CompressionConfig(method="codebook", method_config=BASE), device="cpu", progress=False
    )
    budget = bits_per_weight(uniform)["compressed_linears"]
    mixed = _model()
    cfg = CompressionConfig(method="codebook", method_config=BASE, bit_budget=budget, bit_options=OPTIONS)
    resume = tmp_path_factory.mktemp("mixed") / "blocks"
    rep_m = compress_model(mixed, windows, cfg, device="cpu", progress=False, resume_dir=resume)
    return {"uniform": (uniform, rep_u), "mixed": (mixed, rep_m), "budget": budget, "cfg": cfg, "resume": resume}


def test_mixed_bits_meet_the_budget_by_the_one_counting_function(uniform_and_mixed):
    mixed, rep = uniform_and_mixed["mixed"]
    budget = uniform_and_mixed["budget"]
    bits, weights = _storage_bits(mixed)
    assert bits <= budget_bits(budget, weights)  # exact integer bits
    assert bits_per_weight(mixed)["compressed_linears"] <= budget + 1e-12
    assert bits == rep.bit_allocation["allocation"]["total_bits"]
    nbits = {r.name: mixed.get_submodule(r.name).fmt.nbits_per_codebook for r in rep.layers}
    # the report records each layer's option and bits, and the layer really has that format
    for r in rep.layers:
        assert OPTIONS[r.option]["nbits"] == nbits[r.name]
        assert r.bits_per_weight == pytest.approx(mixed.get_submodule(r.name).bits_per_weight())
    # the clustered MLPs need no more than 3 bits; the saved bits went to attention
    assert {n for n, b in nbits.items() if b == 3} >= {n for n in nbits if ".mlp." in n}
    assert any(b > 4 for n, b in nbits.items() if ".self_attn." in n)
    assert rep.bit_allocation["allocation"]["status"] == "optimal"  # the budget binds: not every option fits


def test_sensitivity_allocation_beats_uniform_at_the_same_bits(uniform_and_mixed):
    uniform, rep_u = uniform_and_mixed["uniform"]
    mixed, rep_m = uniform_and_mixed["mixed"]
    assert bits_per_weight(mixed)["compressed_linears"] <= bits_per_weight(uniform)["compressed_linears"] + 1e-12
    # Summed relative Hessian-weighted error of the real (true-sequential) compression of every layer.
    err_u = sum(r.relative_error for r in rep_u.layers)
    err_m = sum(r.relative_error for r in rep_m.layers)
    assert err_m < 0.9 * err_u, (err_m, err_u)


def test_mixed_formats_run_through_the_kernels(uniform_and_mixed):
    """Every option's format is one the Triton kernels take (nbits 3, 5, 6 too): each layer's kernel
    (interpreter on CPU) matches its PyTorch reference, at 1 token (gemv) and 3 tokens (mm)."""
    from lit_cb.kernels import dispatch

    mixed, _ = uniform_and_mixed["mixed"]
    layers = [m for m in mixed.modules() if isinstance(m, CodebookLinear)]
    assert len({m.fmt.nbits_per_codebook for m in layers}) > 2
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad(), dispatch.interpreter_on_cpu():
        for m in {m.fmt: m for m in layers}.values():  # one layer per format
            for tokens in (1, 3):
                x = torch.randn(tokens, m.in_features, generator=gen)
                kernel = dispatch.select_kernel(m.fmt, x)
                assert kernel is not None, m.fmt
                y = kernel(x, m.codes, m.codebooks, m.scales, m.bias, m.fmt)
                ref = x @ m.dequantize().float().T
                assert float((y.float() - ref).norm() / ref.norm()) < 2e-3, m.fmt


def test_resume_reuses_bit_allocation_json(uniform_and_mixed, tmp_path, monkeypatch):
    cfg, resume = uniform_and_mixed["cfg"], uniform_and_mixed["resume"]
    path = resume / sensitivity.ALLOCATION_FILE
    stored = json.loads(path.read_text())
    assert stored["choice"] == uniform_and_mixed["mixed"][1].bit_allocation["choice"]

    def no_measuring(*args, **kwargs):
        raise AssertionError("the sensitivity pass ran again on resume")

    monkeypatch.setattr(sensitivity, "measure_sensitivity", no_measuring)
    # Finished blocks and the allocation reused: nothing measured, the file unchanged.
    model = _model()
    rep = compress_model(model, _windows(), cfg, device="cpu", progress=False, resume_dir=resume)
    assert rep.bit_allocation["reused"] and json.loads(path.read_text()) == stored
    # A run started from another run's blocks (compression.blocks_from) resumes them as its own: where they
    # came from is not what they were made with. Files written before that distinction (with the key) too.
    assert "blocks_from" not in stored["config"]
    copied = dataclasses.replace(cfg, blocks_from=str(tmp_path / "elsewhere"))
    rep = compress_model(_model(), _windows(), copied, device="cpu", progress=False, resume_dir=resume)
    assert rep.bit_allocation["reused"]
    path.write_text(json.dumps(dict(stored, config={**stored["config"], "blocks_from": None})))
    rep = compress_model(_model(), _windows(), copied, device="cpu", progress=False, resume_dir=resume)
    assert rep.bit_allocation["reused"]
    path.write_text(json.dumps(stored))
    # Interrupted after the allocation, before any block: the file's choice is what compression uses
    # (here hand-edited, so a re-measured allocation could not match it).
    fresh = tmp_path / "blocks"
    fresh.mkdir()
    edited = dict(stored, choice={**stored["choice"], "model.layers.0.mlp.down_proj": 3})
    (fresh / sensitivity.ALLOCATION_FILE).write_text(json.dumps(edited))
    model = _model()
    compress_model(model, _windows(), cfg, device="cpu", progress=False, resume_dir=fresh)
    assert model.get_submodule("model.layers.0.mlp.down_proj").fmt.nbits_per_codebook == 6
    # Another config must not reuse it.
    other = CompressionConfig(
        method="codebook", method_config=BASE, bit_budget=cfg.bit_budget + 0.5, bit_options=OPTIONS
    )
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / sensitivity.ALLOCATION_FILE).write_text(json.dumps(stored))
    with pytest.raises(ValueError, match="made with another compression config"):
        compress_model(_model(), _windows(), other, device="cpu", progress=False, resume_dir=tmp_path / "other")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bit_budget": 2.0, "bit_options": [{"nbits": 40}]}, r"compression.bit_options\[0\].*nbits=40"),
        ({"bit_budget": 2.0, "bit_options": [{"in_group_size": 3}]}, r"compression.bit_options\[0\].*in_group_size=3"),
        ({"bit_budget": 2.0, "bit_options": [{"nbitz": 3}]}, r"unknown config key.*compression.bit_options\[0\].nbitz"),
        ({"bit_budget": 2.0, "bit_options": [{"nbits": 4}, {}]}, r"bit_options\[1\]=\{\} gives the same config as"),
        ({"bit_budget": 2.0}, r"compression.bit_budget=2.0 needs compression.bit_options"),
        ({"bit_options": [{"nbits": 3}]}, r"compression.bit_options is set but compression.bit_budget is null"),
        ({"bit_budget": -1.0, "bit_options": [{"nbits": 3}]}, r"compression.bit_budget=-1.0 must be a finite"),
        ({"method": "rtn", "method_config": {}, "bit_budget": 2.0, "bit_options": [{"bits": 2}]}, r"allowed: \['aqlm'"),
        ({"bit_budget": 2.0, "bit_options": [{"nbits": 3}], "sensitivity_max_rows": 0}, r"sensitivity_max_rows=0"),
    ],
)
def test_invalid_options_fail_in_the_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CompressionConfig(**{"method": "codebook", "method_config": BASE, **kwargs})


def test_unreachable_budget_and_unfit_option_fail_before_any_work(tmp_path, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("work started")

    monkeypatch.setattr(sensitivity, "measure_sensitivity", no_work)
    monkeypatch.setattr("lit_cb.compress.capture_block_inputs", no_work)
    cfg = CompressionConfig(method="codebook", method_config=BASE, bit_budget=0.5, bit_options=OPTIONS)
    with pytest.raises(ValueError, match=r"compression.bit_budget=0.5 is unreachable.*cheapest.*needs 1\.\d+ bits"):
        compress_model(tiny_llama(), _windows(), cfg, device="cpu", progress=False, resume_dir=tmp_path / "b")
    assert not (tmp_path / "b").exists()
    # An option whose group size does not divide a layer (hidden 72, AQLM g16), also in the preflight check.
    from lit_cb.preflight import check_model

    model = tiny_llama(hidden=72)
    aqlm = CompressionConfig(
        method="aqlm",
        method_config={"num_codebooks": 1, "nbits_per_codebook": 4, "in_group_size": 8},
        bit_budget=2.0,
        bit_options=[{}, {"in_group_size": 16}],
    )
    for run in (lambda: check_model(model, aqlm), lambda: compress_model(model, _windows(), aqlm, device="cpu")):
        with pytest.raises(ValueError, match=r"bit_options\[1\]=\{'in_group_size': 16\} does not fit layer model"):
            run()


def test_aqlm_mixed_codebooks_meet_the_budget():
    """AQLM: 1 or 2 codebooks per layer at a budget between the two uniform settings."""
    base = {"num_codebooks": 1, "nbits_per_codebook": 4, "in_group_size": 8, "max_epochs": 1, "beam_size": 2}
    base |= {"codebook_steps": 5, "init_kmeans_iters": 2}
    options = [{}, {"num_codebooks": 2}]
    model = tiny_llama(num_layers=1)
    probe = CompressionConfig(method="aqlm", method_config=base, bit_budget=1.0, bit_options=options)
    from lit_cb.preflight import target_linears

    layers = target_linears(model, probe.targets)
    costs = [sensitivity.option_costs(m, probe.bit_option_settings()) for m in layers.values()]
    n = sum(m.in_features * m.out_features for m in layers.values())
    budget = (sum(c[0] for c in costs) + sum(c[1] for c in costs)) / 2 / n  # halfway
    cfg = CompressionConfig(method="aqlm", method_config=base, bit_budget=budget, bit_options=options)
    rep = compress_model(model, _windows(), cfg, device="cpu", progress=False)
    bits, weights = _storage_bits(model)
    assert bits <= budget_bits(budget, weights) and bits_per_weight(model)["compressed_linears"] <= budget
    used = {model.get_submodule(r.name).fmt.num_codebooks for r in rep.layers}
    assert used == {1, 2}, used


# -- torch.distributed: every rank must use the same allocation ----------------------------------------

DIST_CFG = dict(method="codebook", method_config=BASE, bit_options=OPTIONS, hessian_dtype="float64")


def _dist_worker(rank: int, world: int, port: int, out: str, budget: float) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = _model()
        cfg = CompressionConfig(**DIST_CFG, bit_budget=budget)
        rep = compress_model(model, _windows(n=6)[rank::world], cfg, device="cpu", progress=False, resume_dir=out)
        result = {"choice": rep.bit_allocation["choice"], "errors": rep.bit_allocation["allocation"]["error"]}
        result["bits"] = _storage_bits(model)
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_ranks_share_one_allocation_equal_to_one_process(tmp_path):
    import socket

    import torch.multiprocessing as mp

    budget = 1.95
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_dist_worker, args=(2, port, str(tmp_path), budget), nprocs=2, join=True, start_method="fork")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1] and len(set(ranks[0]["choice"].values())) > 1  # a real trade-off
    stored = json.loads((tmp_path / sensitivity.ALLOCATION_FILE).read_text())
    assert stored["choice"] == ranks[0]["choice"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = compress_model(
            _model(), _windows(n=6), CompressionConfig(**DIST_CFG, bit_budget=budget), device="cpu", progress=False
        )
    finally:
        torch.set_num_threads(threads)
    # float64 Hessians all-reduced over the shards: the same measured errors, the same allocation
    assert single.bit_allocation["choice"] == ranks[0]["choice"]
    assert single.bit_allocation["allocation"]["error"] == pytest.approx(ranks[0]["errors"], rel=1e-6)


# -- the whole run: config keys, preflight, metrics.json, the saved model -----------------------------


def test_run_with_a_bit_budget_saves_a_mixed_model_within_budget(tmp_path, tiny_tokenizer):
    from lit_cb.config import load_config
    from lit_cb.pipeline import run
    from lit_cb.serialization import load_compressed

    model_dir = tmp_path / "tiny"
    tiny_llama(num_layers=1, vocab=len(tiny_tokenizer)).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    overrides = {
        "run_name": "mixed",
        "output_dir": str(tmp_path / "out"),
        "model.name": str(model_dir),
        "data.num_calibration_samples": 4,
        "data.calibration_seqlen": 32,
        "data.num_finetune_samples": 8,
        "data.finetune_seqlen": 32,
        "data.num_val_samples": 2,
        "data.eval_seqlen": 64,
        "data.max_eval_windows": 2,
        "compression.method": "codebook",
        "compression.method_config": "{in_group_size: 4, nbits: 4, kmeans_iters: 2}",
        "compression.bit_budget": 1.6,
        "compression.bit_options": "[{nbits: 3}, {nbits: 4}, {nbits: 5}]",
        "recovery.max_steps": 0,
        "eval.float_model": False,
        "trainer.accelerator": "cpu",
    }
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    metrics = run(cfg)
    assert metrics["bits_per_weight"]["compressed_linears"] <= 1.6
    report = metrics["compression_report"]
    assert (
        report["bit_allocation"]["choice"]
        == json.loads((cfg.run_dir / "blocks" / "bit_allocation.json").read_text())["choice"]
    )
    assert {r["option"] for r in report["layers"]} <= {0, 1, 2} and len({r["option"] for r in report["layers"]}) > 1
    assert "sensitivity" in report["stages"]
    model, _, _ = load_compressed(cfg.run_dir / "model")
    formats = {m.fmt.nbits_per_codebook for m in model.modules() if isinstance(m, CodebookLinear)}
    assert len(formats) > 1 and bits_per_weight(model)["compressed_linears"] <= 1.6
    # An unreachable budget fails in the preflight check, before the run folder is written.
    bad = load_config(
        None, [f"{k}={v}" for k, v in {**overrides, "run_name": "bad", "compression.bit_budget": 0.9}.items()]
    )
    with pytest.raises(ValueError, match=r"compression.bit_budget=0.9 is unreachable"):
        run(bad)
    assert not bad.run_dir.exists()


# -- the trellis: bits per step allocated per layer ------------------------------------------------------

TRELLIS_BASE = {"state_bits": 6, "bits_per_step": 2, "tile_rows": 16, "tile_cols": 8}
TRELLIS_OPTIONS = [{"bits_per_step": 1}, {"bits_per_step": 2}, {"bits_per_step": 3}]


@pytest.mark.parametrize("between", [(1, 2), (2, 3)])
def test_trellis_bits_per_step_meet_the_budget_and_save_as_allocated(between, tmp_path, tiny_tokenizer):
    """The trellis through the same allocation: with a budget halfway between two uniform settings, each layer
    takes k = 1, 2 or 3 bits per step, the layers' own storage bits are within the budget and equal the
    allocation's total, every layer has the format its recorded option says (both settings around the budget are
    used), each layer's measured error falls with its bits, and the saved model loads back with those formats
    and the same logits."""
    from lit_cb.preflight import target_linears
    from lit_cb.serialization import load_compressed, save_compressed
    from lit_cb.trellis import TrellisLinear

    model = tiny_llama(num_layers=1)
    probe = CompressionConfig(method="trellis", method_config=TRELLIS_BASE, bit_budget=3.5, bit_options=TRELLIS_OPTIONS)
    layers = target_linears(model, probe.targets)
    costs = [sensitivity.option_costs(m, probe.bit_option_settings()) for m in layers.values()]
    n = sum(m.in_features * m.out_features for m in layers.values())
    lo, hi = (sum(c[k - 1] for c in costs) for k in between)
    budget = (lo + hi) / 2 / n
    cfg = CompressionConfig(
        method="trellis", method_config=TRELLIS_BASE, bit_budget=budget, bit_options=TRELLIS_OPTIONS
    )
    rep = compress_model(model, _windows(), cfg, device="cpu", progress=False, resume_dir=tmp_path / "blocks")

    done = {name: m for name, m in model.named_modules() if isinstance(m, TrellisLinear)}
    assert len(done) == len(layers) == 7
    bits = sum(sum(m.fmt.storage_bits().values()) for m in done.values())
    assert bits <= budget_bits(budget, n) and bits == rep.bit_allocation["allocation"]["total_bits"]
    assert bits_per_weight(model)["compressed_linears"] <= budget + 1e-12
    ks = {r.name: done[r.name].fmt.bits_per_step for r in rep.layers}
    for r in rep.layers:
        assert TRELLIS_OPTIONS[r.option]["bits_per_step"] == ks[r.name]
    assert set(between) <= set(ks.values()), ks  # both sides of the budget (small layers may take k = 3 too)
    # the measured errors (float model, bit_allocation.json) fall with more bits on every layer
    errors = json.loads((tmp_path / "blocks" / sensitivity.ALLOCATION_FILE).read_text())["errors"]
    assert all(e[0] > e[1] > e[2] for e in errors.values()), errors

    ids = _windows(n=2)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    folder = save_compressed(model, tmp_path / "saved", tokenizer=tiny_tokenizer)
    loaded = load_compressed(folder)[0]
    again = {name: m.fmt.bits_per_step for name, m in loaded.named_modules() if isinstance(m, TrellisLinear)}
    assert again == ks
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, before, atol=1e-5, rtol=1e-4)


def test_trellis_sensitivity_samples_whole_row_tiles():
    """The sensitivity pass measures a trellis option on whole tiles of rows (the walks run over ``tile_rows``
    rows), however few rows are asked for; no sample where that would be every row."""
    from lit_cb.configs.trellis import TrellisConfig

    settings = [TrellisConfig(bits_per_step=k, tile_rows=32, tile_cols=8) for k in (1, 2, 3)]
    layer = torch.nn.Linear(64, 1536, bias=False)
    rows = sensitivity._sample_rows(layer, settings, 100, seed=0)
    assert len(rows) == 128 and len(set(rows.tolist())) == 128  # 100 rounded up to whole 32-row tiles
    tiles = rows.reshape(-1, 32)
    assert torch.equal(tiles - tiles[:, :1], torch.arange(32).expand(4, 32)) and bool((tiles[:, 0] % 32 == 0).all())
    assert sensitivity._sample_rows(torch.nn.Linear(64, 128, bias=False), settings, 100, seed=0) is None
