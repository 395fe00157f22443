"""The batch-1 kernel's codeword gathers, cross-compiled for sm_90 on this CPU (bench/ptx_loads.py, in its
own process: the tests' TRITON_INTERPRET=1 makes kernels Python functions): one vector load per codeword
(8 bytes for 1x8 g4, 16 for 2x8 g8), never one 2-byte load per weight. A change that breaks the
vectorisation (an offset whose alignment Triton cannot prove) fails here, without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORMATS = {"1x8_g4": ("ld.global.v2.b32", 1), "2x8_g8": ("ld.global.v4.b32", 2)}  # vector load, codebooks


def test_codewords_are_gathered_with_one_vector_load_each(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    out = tmp_path / "ptx.json"
    cmd = [sys.executable, "bench/ptx_loads.py", "--formats", ",".join(FORMATS), "--shapes", "11008x4096"]
    cmd += ["--tokens", "1"]
    proc = subprocess.run([*cmd, "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["format"] for r in rows] == list(FORMATS)
    for row in rows:
        vector, codebooks = FORMATS[row["format"]]
        kinds: dict[str, int] = {}
        for per_line in row["loads"].values():
            for kind, n in per_line.items():
                kinds[kind] = kinds.get(kind, 0) + n
        assert "ld.global.b16" not in kinds, row  # no scalar fp16 loads: codewords and x come whole
        tile = row["tile"]
        # each K step, the tile's codewords (block_n rows x block_g groups x M codebooks) spread over its threads
        per_thread = tile["block_n"] * tile["block_g"] * codebooks // (32 * tile["num_warps"])
        assert kinds.get(vector, 0) >= per_thread, (row, per_thread)


def test_table_gemv_lanes_sit_on_rows_and_load_codes_as_vectors(tmp_path):
    """The lookup-table matvec's design holds in the compiled code (lit_cb/kernels/table_gemv.py): its code and
    table loads run with the 32 lanes of a warp along the rows, so a warp's gathers
    all fall in one code column's table window; a lane's 16 code columns come as one 16-byte vector load, and
    each of them costs one 2-byte table load per token (no codeword, no multiply). Two tokens share the codes'
    load."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    out = tmp_path / "ptx.json"
    cmd = [sys.executable, "bench/ptx_loads.py", "--table", "--formats", ",".join(FORMATS), "--tokens", "1,2"]
    cmd += ["--shapes", "11008x4096,4096x11008", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 8 and {r["tokens"] for r in rows} == {1, 2}
    for row in rows:
        tile = row["tile"]
        assert tile["block_t"] == row["tokens"], row
        rows_per_lane = tile["block_n"] // (32 * tile["num_warps"])
        kinds: dict[str, int] = {}
        for per_line in row["loads"].values():
            for kind, n in per_line.items():
                kinds[kind] = kinds.get(kind, 0) + n
        gathers = tile["chunk"] * rows_per_lane * row["tokens"]
        global_loads = {k: v for k, v in kinds.items() if k.startswith("ld.global")}
        assert global_loads == {"ld.global.v4.b32": rows_per_lane, "ld.global.b16": gathers}, row
        # shared memory only after the loop (the epilogue's layout change for a 2-D store), never between the code
        # load and the gathers
        line_of = {k: int(line.split(":")[1]) for line, per in row["loads"].items() for k in per}
        shared_lines = [int(line.split(":")[1]) for line, per in row["loads"].items() if "ld.shared.b32" in per]
        assert all(n > line_of["ld.global.b16"] for n in shared_lines), row
        # the codes [rows, chunk] and the gathers [tokens, chunk, rows]: 32 lanes on the rows axis of both
        codes_layout, gather_layout = row["load_layouts"]
        assert "threadsPerWarp = [32, 1]" in codes_layout and "sizePerThread = [1, 16]" in codes_layout, row
        assert "threadsPerWarp = [1, 1, 32]" in gather_layout, row
        # few registers, so many warps stay resident (the tl.gather table kernel needed 168: 13% occupancy)
        assert row["registers"] <= 40 * row["tokens"], row  # 32 at one token, 72 at two (sm_90, triton 3.9)
