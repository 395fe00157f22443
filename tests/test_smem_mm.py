"""The shared-memory-table tensor-core prototype (lit_cb/kernels/smem_mm.py) without a GPU.

(1) Under the interpreter the kernel runs with ``EMULATE`` (codewords loaded from global memory in place of
the table's asm gather): the persistent tile walk, masks, the codeword interleave into the ``tl.dot``
operand, scales and bias are checked against float64. (2) The real kernel is cross-compiled for sm_90 in a
process without TRITON_INTERPRET (bench/ptx_loads.py --smem): codeword gathers are ``ld.shared`` vectors in
the inner loop and none comes from global memory, the asm barriers are in order, the launch's shared memory
covers the table, and Triton's own buffers that are live with the table (the dot operands' staging, the
epilogue's layout conversion) are the probe compile's, below the table. (3) Dispatch only when opted in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_cb.kernels import smem_mm as SM
from lit_cb.kernels import smem_table as S
from tests.test_kernels import OPS, _fmt, random_layer, reference_out, rel_err

ROOT = Path(__file__).resolve().parents[1]
FORMATS = {"1x8_g4": (1, 8, 4), "2x8_g8": (2, 8, 8)}  # (M, B, g)


@pytest.fixture()
def nan_empty(monkeypatch):
    """Outputs start as NaN, so an element no program writes fails the comparison."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(SM.torch, "empty", poisoned)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize(("tokens", "cb_dtype", "bias"), [(4, torch.float16, True), (20, torch.bfloat16, False)])
def test_emulated_kernel_matches_float64(fmt, tokens, cb_dtype, bias, nan_empty):
    """Ragged rows (70: three row tiles of 32, the last partial), groups (21: no multiple of the K step) and
    tokens (20: a full and a partial token tile), more tiles than programs (the persistent walk). x is fp16:
    the interpreter's tl.dot has no bf16 (bench/kernel_bench.py --smem-check-only runs bf16 on the GPU)."""
    m, b, g = FORMATS[fmt]
    layer = _fmt(m, b, g, 21 * g, 70, bias)
    idx, codes, codebooks, scales, bias_t = random_layer(layer, torch.Generator().manual_seed(tokens), cb_dtype)
    x = torch.randn(tokens, layer.in_features, generator=torch.Generator().manual_seed(1)).half()
    cfg = SM.SmemMMConfig(block_m=16, block_n=32, block_g=max(1, 32 // g), num_warps=1, ctas_per_sm=2)
    y = SM.codebook_mm_smem(x, codes, codebooks, scales, bias_t, b, cfg)
    assert y.shape == (tokens, 70) and y.dtype == torch.float16
    assert rel_err(y, reference_out(x, idx, codebooks, scales, bias_t)) < 3e-3


def test_supports_and_config():
    x = torch.zeros(16, 64, dtype=torch.float16)
    u8 = torch.zeros(8, 8, 2, dtype=torch.uint8)
    cb = torch.zeros(2, 256, 1, 8, dtype=torch.float16)
    assert SM.supports(x, u8, cb, 8)
    assert not SM.supports(torch.zeros(65, 64, dtype=torch.float16), u8, cb, 8)  # mm's range ends at 64 tokens
    assert not SM.supports(x, u8, torch.zeros(1, 2, 256, 1, 8, dtype=torch.float16), 8)  # fused parts
    for tokens, block_m in ((3, 16), (16, 16), (17, 32), (64, 64)):
        assert SM.mm_config(tokens, 8).block_m == block_m
    assert SM.mm_config(16, 8).block_g * 8 == SM.mm_config(16, 4).block_g * 4 == 128


def test_dispatch_takes_it_only_when_opted_in_and_never_interpreted(monkeypatch):
    monkeypatch.setenv(S.ENV_FLAG, "1")
    x = torch.zeros(16, 64, dtype=torch.float16)  # CPU: not even opted in and uninterpreted
    assert not OPS._smem_tables_mm(x, torch.zeros(8, 8, 2, dtype=torch.uint8), torch.zeros(2, 256, 1, 8), 8)
    fmt = _fmt(2, 8, 8, 64, 37, True)
    idx, codes, codebooks, scales, bias = random_layer(fmt, torch.Generator().manual_seed(0))
    x = torch.randn(5, 64, dtype=torch.float16)
    called = []
    monkeypatch.setattr(SM, "codebook_mm_smem", lambda *a, **k: called.append(1))
    out = OPS.run_algo(x, codes, codebooks, scales, bias, 8, "mm")  # the interpreter: the existing mm
    assert not called
    assert rel_err(out, reference_out(x, idx, codebooks, scales, bias)) < 3e-3


def _compile_rows(tmp_path, shapes: str, tokens: str, *extra: str) -> list[dict]:
    """bench/ptx_loads.py --smem in its own process (the tests' TRITON_INTERPRET=1 makes kernels Python)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = tmp_path / "ptx.json"
    cmd = [sys.executable, "bench/ptx_loads.py", "--smem", "--formats", ",".join(FORMATS), "--shapes", shapes]
    cmd += ["--tokens", tokens, "--out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())["rows"]


def test_sm90_mm_gathers_codewords_from_the_table_above_tritons_dot_staging(tmp_path):
    rows = _compile_rows(tmp_path, "11008x4096", "16")
    assert [r["format"] for r in rows] == list(FORMATS)
    for row in rows:
        m, b, g = FORMATS[row["format"]]
        plan, rep, tile = row["shared_plan"], row["smem"], row["tile"]
        assert row["kernel"] == "mm_smem" and tile["block_m"] == 16
        vec = "v4" if g == 8 else "v2"
        gathers = row["per_thread_per_k_step"]["codeword_gathers"]
        assert gathers == tile["block_n"] * tile["block_g"] * m // (32 * tile["num_warps"])
        loads = rep["inner_loop_loads"]
        # every codeword of the K step is one shared vector load from the gather asm ...
        assert loads["gather"] == {f"ld.shared.{vec}.b32": gathers}, row
        assert rep["gathers_in_inner_loop"] == gathers
        # ... and the loop's global loads are the codes' and x's: a few vectors, none per codeword
        global_loads = sum(n for kinds in loads.values() for k, n in kinds.items() if k.startswith("ld.global"))
        assert global_loads < gathers, loads
        assert not any(k.startswith("ld.global") for k in loads["gather"])
        # staging between the asm barriers, gathers after the release
        assert rep["asm_barriers"] == {"acquire": 1, "release": 1}
        assert rep["staging_stores"] == m * 2**b * tile["ncopies"] // (32 * tile["num_warps"])
        assert rep["staging_after_acquire"] and rep["staging_before_release"] and rep["gathers_after_release"]
        # the launch covers the table, which sits above everything Triton keeps in shared memory meanwhile
        assert plan["table_bytes"] == S.table_bytes(m, b, g, tile["ncopies"])
        assert plan["shared"] >= plan["table_off"] + plan["table_bytes"] == plan["reserve_bytes"]
        assert 0 < plan["probe_shared"] <= plan["table_off"]  # tl.dot stages its operands: Triton's own use
        live = rep["triton_buffers_live_with_table"]
        assert {a["op"] for a in live} >= {"ttg.local_alloc"}, live  # the dot operands
        assert rep["buffers_as_in_probe"] and rep["buffers_below_table"], live
        assert all(a["offset"] + (a["size"] or 0) <= plan["probe_shared"] for a in live)
        assert rep["ctas_per_sm"] == S.SMEM_PER_SM // (plan["shared"] + S.SMEM_PER_CTA_RESERVED)
