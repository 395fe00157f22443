"""The dispatcher's per-shape tiles (lit_cb/kernels/ops.py GEMV_TILES / MM_DECODE_TILES / DEQUANT_TILES) against the
H100 sweep they were read from (bench/results/kernels_sweep_h100.json), and each chosen tile run in the
Triton CPU interpreter against float64 at a small shape with the same config parameters."""

from __future__ import annotations

import json
import pathlib
import re

import pytest
import torch

from tests.test_kernels import (  # noqa: F401  (_poison_empty: NaN-filled outputs catch unwritten elements)
    OPS,
    TOL,
    K,
    _fmt,
    _poison_empty,
    random_layer,
    reference_out,
    rel_err,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
SWEEP = ROOT / "bench" / "results" / "kernels_sweep_h100.json"
FORMATS = {"2x8_g8": (2, 8, 8), "1x8_g4": (1, 8, 4)}  # the sweep's formats: (M, B, g)
ALGO_BY_BATCH = {1: "gemv", 16: "mm", 2048: "dense"}  # dispatch.ALGO_TABLE at the sweep's token counts
NEAR_TIE = 1.05  # the class rule may run another tile than a row's winner only if measured within 5% of it


def _sweep() -> dict:
    return json.loads(SWEEP.read_text())


def variant_config(variant: str, g: int):
    """The kernel config a sweep variant name stands for (bench/kernels_sweep_gpu.py ``variants``)."""
    if variant == "gemv(prev)":
        return K.GemvConfig(block_n=8, block_g=max(1, 1024 // g), num_warps=8, num_stages=2)
    if variant == "dense(prev)":
        return K.DequantConfig(8, 128, 4) if g <= 4 else K.DequantConfig(16, 64, 8)
    if m := re.fullmatch(r"gemv_n(\d+)_k(\d+)_w(\d+)_s(\d+)", variant):
        bn, bk, w, s = map(int, m.groups())
        return K.GemvConfig(block_n=bn, block_g=max(1, bk // g), num_warps=w, num_stages=s)
    if m := re.fullmatch(r"mm_m(\d+)_n(\d+)_k(\d+)_w(\d+)_split(\d+)", variant):
        bm, bn, bk, w, split = map(int, m.groups())
        return K.MMConfig(block_m=bm, block_n=bn, block_g=max(1, bk // g), num_warps=w, num_stages=1, split_k=split)
    if m := re.fullmatch(r"dense_n(\d+)_k(\d+)_w(\d+)", variant):
        bn, bk, w = map(int, m.groups())
        return K.DequantConfig(block_n=bn, block_g=max(1, bk // g), num_warps=w)
    return None  # lut, split variants of other families, chunked dense: not tiles the dispatcher picks from


def _measured_keys() -> list[str]:
    return sorted(_sweep()["summary"])


@pytest.mark.parametrize("key", _measured_keys())
def test_dispatch_runs_the_sweep_winner_or_a_near_tie(key):
    """Every summary row: the dispatcher's tile for that shape, token count and format is the row's winner,
    or a tile the same sweep measured within 5% of it (the two documented near-ties)."""
    doc = _sweep()
    shape, batch, fname = key.split()
    n, k = map(int, shape.split("x"))
    batch = int(batch[1:])
    g = FORMATS[fname][2]
    algo = ALGO_BY_BATCH[batch]
    chosen = OPS.kernel_config(algo, batch, n, k, g, FORMATS[fname][0], num_sms=132)
    rows = [
        r
        for r in doc["layers"]
        if (r["shape"], r["batch"], r["format"]) == (shape, batch, fname) and "us" in r and r["variant"] != "lut"
    ]
    timed = {r["variant"]: r["us"] for r in rows if not r["variant"].startswith(("dequant_only", "floor"))}
    winner = doc["summary"][key]
    assert winner["us"] == min(timed.values())
    if variant_config(winner["variant"], g) == chosen:
        return
    same = [v for v in timed if variant_config(v, g) == chosen]
    assert same, f"{key}: the dispatcher's {chosen} was not measured; winner {winner}"
    assert min(timed[v] for v in same) <= NEAR_TIE * winner["us"], (key, chosen, winner)


def test_near_ties_are_only_the_documented_two():
    doc = _sweep()
    off = []
    for key, winner in doc["summary"].items():
        shape, batch, fname = key.split()
        n, k = map(int, shape.split("x"))
        g = FORMATS[fname][2]
        chosen = OPS.kernel_config(ALGO_BY_BATCH[int(batch[1:])], int(batch[1:]), n, k, g, num_sms=132)
        if variant_config(winner["variant"], g) != chosen:
            off.append(key)
    assert sorted(off) == ["4096x4096 b1 1x8_g4", "4096x4096 b2048 1x8_g4"]


def test_shape_classes():
    assert OPS.shape_class(4096, 4096) == OPS.shape_class(4096, 11008) == "narrow"
    assert OPS.shape_class(11008, 4096) == OPS.shape_class(12288, 4096) == OPS.shape_class(22016, 4096) == "wide"
    assert OPS.shape_class(28672, 8192) == "huge"
    # every class and group size has a tile for each family
    for cls in ("narrow", "wide", "huge"):
        assert cls in OPS.MM_DECODE_TILES and cls in OPS.DEQUANT_TILES
        assert (cls, True) in OPS.GEMV_TILES and (cls, False) in OPS.GEMV_TILES


# the measured shape of each class, so the config is the one the H100 runs there
CLASS_SHAPES = {"narrow": (4096, 11008), "wide": (11008, 4096), "huge": (28672, 8192)}


@pytest.mark.parametrize("fname", list(FORMATS))
@pytest.mark.parametrize("cls", list(CLASS_SHAPES))
def test_chosen_tiles_compute_the_right_output(cls, fname):
    """Each family's tile for this class and format, as the dispatcher builds it for the measured shape, run at
    37 x 1024 (ragged rows; 4-8 K tiles, so split-K 4 really splits) against float64."""
    m, b, g = FORMATS[fname]
    n_big, k_big = CLASS_SHAPES[cls]
    fmt = _fmt(m, b, g, 1024, 37, True)
    gen = torch.Generator().manual_seed(len(cls) * 10 + g)
    idx, codes, codebooks, scales, bias = random_layer(fmt, gen)
    for tokens, algo in ((1, "gemv"), (5, "mm"), (70, "dense")):
        cfg = OPS.kernel_config(algo, tokens, n_big, k_big, g, m, num_sms=132)
        x = torch.randn(tokens, fmt.in_features, generator=gen).half()
        ref = reference_out(x, idx, codebooks, scales, bias)
        if algo == "gemv":
            y = K.codebook_gemv(x, codes, codebooks, scales, bias, b, cfg)
        elif algo == "mm":
            assert cfg.split_k == 4
            y = K.codebook_mm(x, codes, codebooks, scales, bias, b, cfg)
        else:
            y = K.codebook_dense(x.float(), codes, codebooks, scales, bias, b, cfg)
        assert y.shape == (tokens, 37)
        assert rel_err(y, ref) < TOL[torch.float16], (algo, cfg)


def test_run_algo_uses_the_class_tiles_for_fused_layers():
    """A fused 3-part layer through the dispatcher (run_algo) on a wide shape: gemv, mm and dense vs float64."""
    from tests.test_kernels_fused import _fused_parts, _ref

    sizes = [96, 80, 80]  # 256 rows > 64 inputs: the wide class
    gen = torch.Generator().manual_seed(9)
    codes, codebooks, scales, bias, w = _fused_parts(2, 8, 8, 64, sizes, True, gen)
    assert OPS.shape_class(sum(sizes), 64) == "wide"
    for tokens, algo in ((1, "gemv"), (5, "mm"), (70, "dense")):
        x = torch.randn(tokens, 64, generator=gen)
        x = x if algo == "dense" else x.half()
        y = OPS.run_algo(x, codes, codebooks, scales, bias, 8, algo, sizes)
        assert rel_err(y, _ref(x, w, bias)) < TOL[torch.float16], algo


def test_unknown_algo_is_refused():
    with pytest.raises(ValueError, match="unknown algo 'fast'"):
        OPS.kernel_config("fast", 1, 8, 8, 8)


def test_bench_scripts_smoke_run_and_record_the_dispatch(tmp_path):
    """bench/kernel_bench.py and bench/decode_7b.py --smoke (the H100 scripts at toy CPU sizes), as processes."""
    import os
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = tmp_path / "kernels.json"
    cmd = [sys.executable, "bench/kernel_bench.py", "--smoke", "--formats", "1x8_g4", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert {"device", "versions", "date", "command", "rows", "fused", "summary"} <= set(doc)
    assert doc["check_failures"] == []
    assert {r["batch"] for r in doc["rows"]} == {1, 16, 80} and {r["algo"] for r in doc["rows"]} == {
        "gemv",
        "mm",
        "dense",
    }
    for r in doc["rows"]:  # the recorded tile is the dispatcher's for that shape
        n, k = map(int, r["shape"].split("x"))
        assert r["config"] == repr(OPS.kernel_config(r["algo"], r["batch"], n, k, 4, 1, 4)) and r["fp16_us"] > 0
    assert all(r["code_read_floor_us"] > 0 for r in doc["rows"] if r["batch"] == 1)
    assert {r["group"] for r in doc["fused"]} == {"qkv", "gate_up"}

    out = tmp_path / "decode.json"
    cmd = [sys.executable, "bench/decode_7b.py", "--smoke", "--fuse", "--batches", "1,2", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert {"device", "versions", "date", "command", "results"} <= set(doc)
    assert all("tok_s" in r for r in doc["results"]), doc["results"]
    names = {r["variant"] for r in doc["results"]}
    assert names == {"fp16", "floor_no_projections", "2x8_g8", "2x8_g8+fused", "1x8_g4", "1x8_g4+fused"}


def test_no_folder_on_a_script_path_shadows_the_kernels_package():
    """transformers (>= 5.25) imports the hub's ``kernels`` package when it loads a model; a
    ``kernels`` module in the repository root or in ``bench/`` (sys.path[0] of ``python
    bench/x.py``) was found first and broke every model load from a checkout."""
    for folder in (ROOT, ROOT / "bench", ROOT / "scripts", ROOT / "recipes"):
        assert not (folder / "kernels").exists() and not (folder / "kernels.py").exists(), folder
