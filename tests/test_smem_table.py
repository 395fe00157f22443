"""The shared-memory-table gemv prototype (lit_cb/kernels/smem_table.py) without a GPU.

Its inline PTX cannot run in Triton's interpreter, so: (1) the table layout and the offsets the asm computes
are checked in plain torch against a codebook lookup, with the bank arithmetic of one load phase; (2) the
kernel is cross-compiled for sm_90 (ptxas included) in a process without TRITON_INTERPRET, and its PTX is
read: gathers are ``ld.shared`` vectors, the table is written between the two asm barriers, Triton adds no
shared-memory use of its own after the table is complete, and the launch's shared memory covers the table;
(3) the dispatcher takes it only when opted in, and never under the interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_cb.kernels import smem_table as S

ROOT = Path(__file__).resolve().parents[1]
FORMATS = {"1x8_g4": (1, 8, 4), "2x8_g8": (2, 8, 8)}  # (M, B, g)
BANKS, BANK_BYTES = 32, 4


def _banks(offset: int, width: int) -> set[int]:
    return {(offset // BANK_BYTES + i) % BANKS for i in range(width // BANK_BYTES)}


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_banked_table_reads_back_every_codeword_from_every_lane(fmt, dtype):
    m, b, g = FORMATS[fmt]
    ncopies = S.default_ncopies(g)
    gen = torch.Generator().manual_seed(0)
    codebooks = torch.randn(m, 2**b, 1, g, generator=gen).to(dtype)
    table = S.banked_table(codebooks, ncopies)
    assert table.numel() == S.table_bytes(m, b, g, ncopies)
    codes = torch.randint(0, 2**b, (64, 32, m), generator=gen)  # [rows, lanes, codebook]
    lanes = torch.arange(32).expand(64, 32)
    for cb in range(m):
        entries = cb * 2**b + codes[..., cb]
        got = S.banked_lookup(table, entries, lanes, g, ncopies, dtype)
        assert torch.equal(got, codebooks[cb, codes[..., cb], 0, :])


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_lanes_of_one_load_phase_hit_distinct_banks_whatever_their_codes(fmt):
    """A 16-byte (8-byte) shared load is served 8 (16) lanes at a time: with one copy per lane of a phase the
    lanes cover all 32 banks exactly once for any codes; the staging stores (slot-major) are as clean."""
    m, b, g = FORMATS[fmt]
    cwb, ncopies = 2 * g, S.default_ncopies(g)
    per_phase = BANKS * BANK_BYTES // cwb
    assert ncopies == per_phase
    gen = torch.Generator().manual_seed(1)
    for _ in range(200):
        entries = torch.randint(0, m * 2**b, (32,), generator=gen)
        offsets = S.banked_offsets(entries, torch.arange(32), g, ncopies)
        assert (offsets % cwb == 0).all()  # vector alignment
        for p in range(32 // per_phase):
            covered = [_banks(int(o), cwb) for o in offsets[p * per_phase : (p + 1) * per_phase]]
            assert set().union(*covered) == set(range(BANKS)), (fmt, entries.tolist())
    # staging: warp w stores slots w*32 .. w*32+31, each at slot * CWB
    for p in range(32 // per_phase):
        covered = [_banks(s * cwb, cwb) for s in range(p * per_phase, (p + 1) * per_phase)]
        assert set().union(*covered) == set(range(BANKS))


def test_gather_asm_offsets_match_the_torch_model():
    """The asm's address arithmetic (copy = laneid & (NCOPIES-1); (code * NCOPIES + copy) * CWB + base), read
    off the generated text, is :func:`smem_table.banked_offsets`."""
    for g in (4, 8):
        ncopies = S.default_ncopies(g)
        asm, constraints = S.gather_asm(g, ncopies, bf16=False)
        assert f"and.b32 %lcb_a, %lcb_a, {ncopies - 1};" in asm
        assert f"mad.lo.u32 %lcb_a, ${g}, {ncopies}, %lcb_a;" in asm
        assert f"mad.lo.u32 %lcb_a, %lcb_a, {2 * g}, ${g + 1};" in asm
        assert f"ld.shared.{'v4' if g == 8 else 'v2'}.b32" in asm
        assert constraints.count("=f") == g and constraints.endswith("r,r")
        code, lane, base = 200, 13, 4096
        asm_offset = ((code * ncopies) + (lane & (ncopies - 1))) * 2 * g + base
        model = S.banked_offsets(torch.tensor(code), torch.tensor(lane), g, ncopies, table_off=base)
        assert asm_offset == int(model)


def test_plan_puts_the_table_above_tritons_own_shared_memory():
    table = 64 * 1024
    assert S.plan_shared(lambda over: over["RESERVE_WORDS"] * 4, table).table_off == 0
    probe_128 = S.plan_shared(lambda over: 128 if over["RESERVE_WORDS"] == 0 else over["RESERVE_WORDS"] * 4, table)
    assert probe_128.table_off >= 128 and probe_128.table_off + table <= probe_128.shared
    with pytest.raises(RuntimeError, match="sizes the reserving gather differently"):
        S.plan_shared(lambda over: 1024, table)  # a Triton whose gather does not reserve the bytes


def test_dispatch_takes_it_only_when_opted_in_and_never_interpreted(monkeypatch):
    monkeypatch.delenv(S.ENV_FLAG, raising=False)
    assert not S.enabled()
    monkeypatch.setenv(S.ENV_FLAG, "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not S.enabled()
    monkeypatch.delenv("TRITON_INTERPRET")
    assert S.enabled()
    from lit_cb.kernels import ops

    x = torch.zeros(1, 64, dtype=torch.float16)  # a CPU tensor: the existing path even when opted in
    codes = torch.zeros(8, 8, 2, dtype=torch.uint8)
    assert not ops._smem_tables(x, codes, torch.zeros(2, 256, 1, 8, dtype=torch.float16), 8)


def test_dispatched_gemv_is_unchanged_under_the_interpreter_with_the_flag_set(monkeypatch):
    from tests.test_kernels import OPS, _fmt, random_layer, reference_out, rel_err

    monkeypatch.setenv(S.ENV_FLAG, "1")
    fmt = _fmt(2, 8, 8, 64, 37, True)
    idx, codes, codebooks, scales, bias = random_layer(fmt, torch.Generator().manual_seed(0))
    x = torch.randn(1, 64, dtype=torch.float16)
    called = []
    monkeypatch.setattr(S, "codebook_gemv_smem", lambda *a, **k: called.append(1))
    out = OPS.run_algo(x, codes, codebooks, scales, bias, 8, "gemv")
    assert not called
    assert rel_err(out, reference_out(x, idx, codebooks, scales, bias)) < 3e-3


def test_supports_only_table_formats():
    x = torch.zeros(1, 64, dtype=torch.float16)
    u8 = torch.zeros(8, 8, 2, dtype=torch.uint8)
    assert S.supports(x, u8, torch.zeros(2, 256, 1, 8, dtype=torch.float16), 8)
    assert S.supports(x, u8[..., :1].repeat(1, 2, 1), torch.zeros(1, 256, 1, 4, dtype=torch.float16), 8)
    assert not S.supports(x, u8, torch.zeros(2, 256, 1, 8, dtype=torch.float32), 8)  # fp32 codebooks
    assert not S.supports(x.float(), u8, torch.zeros(2, 256, 1, 8, dtype=torch.float16), 8)
    assert not S.supports(x, u8, torch.zeros(1, 2, 256, 1, 8, dtype=torch.float16), 8)  # fused parts
    assert not S.supports(x, u8[..., :1].to(torch.int16), torch.zeros(1, 65536, 1, 8, dtype=torch.float16), 16)


def _compile_rows(tmp_path, shapes: str, *extra: str) -> list[dict]:
    """bench/ptx_loads.py --smem in its own process (the tests' TRITON_INTERPRET=1 makes kernels Python)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = tmp_path / "ptx.json"
    cmd = [sys.executable, "bench/ptx_loads.py", "--smem", "--formats", ",".join(FORMATS), "--shapes", shapes]
    cmd += ["--tokens", "1", "--out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["format"] for r in rows] == list(FORMATS)
    return rows


def test_sm90_ragged_bf16_layer_moves_the_table_above_tritons_in_loop_shared_memory(tmp_path):
    """Rows and groups that are no multiples of 16 give byte-wise code loads and a layout conversion in the
    loop (Triton's shared memory at [0, s)): the plan must see it in the probe and lift the table above it."""
    for row in _compile_rows(tmp_path, "1000x1040", "--dtype", "bf16"):
        plan, rep = row["shared_plan"], row["smem"]
        assert plan["shared"] >= plan["table_off"] + plan["table_bytes"]
        assert plan["table_off"] >= plan["probe_shared"]
        if rep["triton_shared_after_release"]:  # Triton's own scratch under the loop: then it was measured
            assert plan["probe_shared"] > 0, row
        assert rep["inner_loop_loads"]["gather"] and rep["asm_barriers"] == {"acquire": 1, "release": 1}


def test_sm90_ptx_gathers_from_shared_memory_between_the_barriers(tmp_path):
    rows = _compile_rows(tmp_path, "11008x4096")
    for row in rows:
        m, b, g = FORMATS[row["format"]]
        tile, plan, rep = row["tile"], row["shared_plan"], row["smem"]
        vec = "v4" if g == 8 else "v2"
        per_thread = tile["block_n"] * tile["block_g"] // (32 * tile["num_warps"])
        loads = rep["inner_loop_loads"]
        # every codeword of the K step is one shared vector load; no global load gathers codewords any more
        assert loads["gather"] == {f"ld.shared.{vec}.b32": per_thread * m}, row
        assert set(loads["x"]) == {f"ld.global.{vec}.b32"}, row  # one vector load per group of x
        assert not any(k.startswith("ld.shared") for who, kinds in loads.items() if who != "gather" for k in kinds)
        assert rep["gathers_in_inner_loop"] == per_thread * m
        # staging: acquire bar.sync, NE * NCOPIES codewords over the CTA's threads, release bar.sync, then gathers
        assert rep["asm_barriers"] == {"acquire": 1, "release": 1}
        assert rep["staging_stores"] == m * 2**b * tile["ncopies"] // (32 * tile["num_warps"])
        assert rep["staging_after_acquire"] and rep["staging_before_release"] and rep["gathers_after_release"]
        assert rep["triton_shared_after_release"] == []  # Triton never touches shared memory under the table
        # the launch's shared memory holds the table, above Triton's own use
        assert plan["table_bytes"] == S.table_bytes(m, b, g, tile["ncopies"])
        assert plan["shared"] >= plan["table_off"] + plan["table_bytes"]
        assert plan["table_off"] >= plan["probe_shared"] == 0
