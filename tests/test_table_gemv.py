"""The lookup-table matvec (lit_cb/kernels/table_gemv.py) against a float64 reference, on the CPU under the Triton
interpreter (CI has no GPU; bench/kernel_bench.py --sweep --sweep-families table checks and times it on one).

TRITON_INTERPRET must be set before the kernels are decorated: the modules are reloaded when another test
imported them for real (as tests/test_kernels.py does).
"""

from __future__ import annotations

import importlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402, F401  (a missing Triton fails the module, never skips it)


def _modules():
    from triton.runtime.interpreter import InterpretedFunction

    codebook = importlib.import_module("lit_cb.kernels.codebook")
    if not isinstance(codebook._splitk_reduce_kernel, InterpretedFunction):
        codebook = importlib.reload(codebook)
    table = importlib.import_module("lit_cb.kernels.table_gemv")
    if not isinstance(table._table_gemv_kernel, InterpretedFunction) or table._reduce_parts is not (
        codebook._reduce_parts
    ):
        table = importlib.reload(table)
    return table


T = _modules()


def layer(n: int, k: int, m: int, b: int, g: int, seed: int = 0, bias: bool = False):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 2**b, (n, k // g, m), generator=gen)
    codebooks = torch.randn(m, 2**b, 1, g, generator=gen).half()
    scales = (torch.rand(n, 1, 1, 1, generator=gen) + 0.5).half()
    b_vec = torch.randn(n, generator=gen).half() if bias else None
    return idx, codebooks, scales, b_vec


def reference(x, idx, codebooks, scales, bias) -> torch.Tensor:
    """float64: W[n, group*g + j] = scales[n] * sum_m codebooks[m, idx[n, group, m], 0, j]."""
    n, groups, m = idx.shape
    cb = codebooks.double()[:, :, 0, :]  # [M, 2**B, g]
    w = sum(cb[mm][idx[:, :, mm]] for mm in range(m))  # [N, groups, g]
    w = w.reshape(n, -1) * scales.double().reshape(n, 1)
    out = x.double() @ w.T
    return out + bias.double() if bias is not None else out


@pytest.mark.parametrize(
    ("n", "k", "m", "b", "g", "tokens", "bias", "cfg"),
    [
        # 1x8 g4, ragged rows, one split (scales in the kernel)
        (70, 64, 1, 8, 4, 1, False, T.TableGemvConfig(block_n=32, num_warps=1, programs_per_sm=1)),
        # 2x8 g8 with bias, two tokens, split-K (partials reduced by the codebook module's epilogue)
        (40, 128, 2, 8, 8, 2, True, T.TableGemvConfig(block_n=32, num_warps=1, programs_per_sm=8)),
        # 1x4 g8: 16-entry tables, three tokens in tiles of two (the second tile half empty)
        (33, 256, 1, 4, 8, 3, False, T.TableGemvConfig(block_n=64, block_t=2, num_warps=2, programs_per_sm=2)),
        # 2x6 g2: 24 code columns a row, so chunks of 8; three tokens in one tile of four
        (20, 24, 2, 6, 2, 3, True, T.TableGemvConfig(block_n=32, num_warps=1)),
        # five tokens, one a program: every token's codes loaded on their own
        (36, 64, 1, 8, 4, 5, True, T.TableGemvConfig(block_n=32, block_t=1, num_warps=1, programs_per_sm=2)),
    ],
)
def test_matches_float64(n, k, m, b, g, tokens, bias, cfg):
    idx, codebooks, scales, b_vec = layer(n, k, m, b, g, bias=bias)
    x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(1)).half()
    codes = T.interleave_codes(idx.to(torch.uint8))
    out = T.table_gemv(x, codes, codebooks, scales, b_vec, b, cfg)
    ref = reference(x, idx, codebooks, scales, b_vec)
    assert out.dtype == x.dtype and out.shape == (tokens, n)
    # fp16 table entries (rounded once per group dot) summed in fp32, then fp16 out
    err = (out.double() - ref).abs().max() / ref.abs().max()
    assert err < 3e-3, err


def test_bf16_inputs_get_fp32_tables():
    """A bf16 input whose group dots overflow fp16 (1e5) comes out finite and right: its tables are fp32."""
    idx, codebooks, scales, _ = layer(40, 64, 1, 8, 4, seed=12)
    x = (torch.randn(1, 64, generator=torch.Generator().manual_seed(13)) * 3e4).bfloat16()
    out = T.table_gemv(x, T.interleave_codes(idx.to(torch.uint8)), codebooks, scales, None, 8,
                       T.TableGemvConfig(block_n=32, num_warps=1))  # fmt: skip
    ref = reference(x, idx, codebooks, scales, None)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert ((out.double() - ref).abs().max() / ref.abs().max()) < 1e-2  # bf16 output rounding


def test_fp32_table_is_exact_to_float32():
    idx, codebooks, scales, _ = layer(50, 128, 1, 8, 4, seed=2)
    x = torch.randn(1, 128, generator=torch.Generator().manual_seed(3))
    codes = T.interleave_codes(idx.to(torch.uint8))
    out = T.table_gemv(x, codes, codebooks, scales, None, 8, T.TableGemvConfig(block_n=32, num_warps=1,
                                                                               table_fp32=True))  # fmt: skip
    ref = reference(x, idx, codebooks, scales, None)
    assert ((out.double() - ref).abs().max() / ref.abs().max()) < 1e-5


def test_tables_are_group_dots_and_can_be_shared():
    """table[t, c, k] = <codebooks[m, k], x[t, group]> (c = group * M + m), checked entry by entry; layers that
    read one input (q/k/v) pass one table and get what they get alone."""
    idx, codebooks, scales, _ = layer(24, 32, 2, 4, 4, seed=4)
    x = torch.randn(2, 32, generator=torch.Generator().manual_seed(5)).half()
    table = T.build_tables(x, codebooks, torch.float32)
    xg = x.double().reshape(2, 8, 4)
    expect = torch.einsum("tgj,mkj->tgmk", xg, codebooks.double()[:, :, 0, :]).reshape(1, 2, 16, 16)
    assert torch.allclose(table.double(), expect, atol=1e-5)
    codes = T.interleave_codes(idx.to(torch.uint8))
    cfg = T.TableGemvConfig(block_n=32, num_warps=1, table_fp32=True)
    shared = T.table_gemv(x, codes, codebooks, scales, None, 4, cfg, table=table)
    assert torch.equal(shared, T.table_gemv(x, codes, codebooks, scales, None, 4, cfg))


@pytest.mark.parametrize("split", [False, True])
def test_fused_parts_use_their_own_tables(split):
    """A fused layer (q/k/v: three row parts, each with its own codebooks and scales) against three float64
    layers, ragged part sizes so that parts meet inside a row tile; with and without split-K."""
    sizes = [24, 40, 17]
    layers = [layer(n, 64, 2, 8, 8, seed=10 + i) for i, n in enumerate(sizes)]
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(9)).half()
    codes = T.interleave_codes(torch.cat([idx for idx, *_ in layers]).to(torch.uint8))
    codebooks = torch.stack([cb for _, cb, _, _ in layers])  # [P, M, 2**B, 1, G]
    scales = torch.cat([s for _, _, s, _ in layers])
    cfg = T.TableGemvConfig(block_n=32, num_warps=1, programs_per_sm=4 if split else 1)
    out = T.table_gemv(x, codes, codebooks, scales, None, 8, cfg, part_sizes=sizes)
    ref = torch.cat([reference(x, idx, cb, s, None) for idx, cb, s, _ in layers], dim=1)
    assert ((out.double() - ref).abs().max() / ref.abs().max()) < 3e-3
    table = T.build_tables(x, codebooks)
    assert table.shape == (3, 2, 16, 256)
    assert torch.equal(T.table_gemv(x, codes, codebooks, scales, None, 8, cfg, sizes, table), out)
    with pytest.raises(ValueError, match="part_sizes"):
        T.table_gemv(x, codes, codebooks, scales, None, 8, cfg, part_sizes=[24, 40])


def test_interleave_is_a_permutation():
    idx = torch.randint(0, 256, (5, 12, 2), generator=torch.Generator().manual_seed(6)).to(torch.uint8)
    il = T.interleave_codes(idx)
    assert il.shape == (3, 5, 8)  # 24 code columns: chunks of 8 (16 does not divide 24)
    assert torch.equal(il.transpose(0, 1).reshape(5, 12, 2), idx)


def test_bad_input_is_named():
    idx, codebooks, scales, _ = layer(8, 32, 1, 8, 4)
    codes = T.interleave_codes(idx.to(torch.uint8))
    x = torch.randn(1, 32).half()
    with pytest.raises(ValueError, match="nbits_per_codebook <= 8, got 9"):
        T.table_gemv(x, codes, codebooks, scales, None, 9)
    with pytest.raises(ValueError, match="do not fit"):
        T.table_gemv(torch.randn(1, 48).half(), codes, codebooks, scales, None, 8)
    with pytest.raises(ValueError, match="uint8"):
        T.interleave_codes(idx.to(torch.int16))
    with pytest.raises(ValueError, match="chunk=3"):
        T.chunk_for(24, 3)


def test_bench_sweep_checks_every_table_variant(tmp_path):
    """bench/kernel_bench.py's table family (the GPU sweep that decides whether the kernel is dispatched) at toy
    sizes: every variant runs and its recorded error against the dense reference is small."""
    import json
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    out = tmp_path / "sweep.json"
    cmd = [sys.executable, "bench/kernel_bench.py", "--smoke", "--formats", "1x8_g4,2x8_g8", "--no-fused"]
    cmd += ["--sweep", "--sweep-families", "table", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=root,
                          env={**os.environ, "TRITON_INTERPRET": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["sweep"]
    assert {(r["shape"], r["format"]) for r in rows} == {
        (s, f) for s in ("48x64", "96x32") for f in ("1x8_g4", "2x8_g8")
    }
    sys.path.insert(0, str(root))
    from bench.kernel_bench import table_variants

    assert len(rows) == 4 * len(table_variants(1, 8)) == 4 * 13 and {r["batch"] for r in rows} == {1}
    assert all(r["variant"].startswith("table_") and r["rel_err"] < 3e-3 and r["us"] > 0 for r in rows), rows


def test_dispatch_opt_in_runs_it_and_follows_code_changes(monkeypatch):
    """With LIT_CB_TABLE_GEMV=1 a gemv call of a one-part layer runs the table kernel on codes interleaved once and
    kept; an in-place change of the codes is seen (version counter), freed codes drop their copy. Without the
    flag the gemv runs as before."""
    import gc

    ops = importlib.import_module("lit_cb.kernels.ops")
    calls = []
    real = T.table_gemv
    monkeypatch.setattr(T, "table_gemv", lambda *a, **k: calls.append(1) or real(*a, **k))
    idx, codebooks, scales, b_vec = layer(64, 64, 2, 8, 8, seed=7, bias=True)
    codes = idx.to(torch.uint8)
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(8)).half()
    monkeypatch.delenv(T.ENV_FLAG, raising=False)
    plain = ops.run_algo(x, codes, codebooks, scales, b_vec, 8, "gemv")
    assert calls == []
    monkeypatch.setenv(T.ENV_FLAG, "1")
    out = ops.run_algo(x, codes, codebooks, scales, b_vec, 8, "gemv")
    assert calls == [1] and id(codes) in T._LAYER_CODES
    ref = reference(x, idx, codebooks, scales, b_vec)
    for y in (out, plain):
        assert ((y.double() - ref).abs().max() / ref.abs().max()) < 3e-3
    codes[:, 0, 0] = 255 - codes[:, 0, 0]  # in place: the kept copy must not be used
    idx[:, 0, 0] = 255 - idx[:, 0, 0]
    out = ops.run_algo(x, codes, codebooks, scales, b_vec, 8, "gemv")
    ref = reference(x, idx, codebooks, scales, b_vec)
    assert ((out.double() - ref).abs().max() / ref.abs().max()) < 3e-3
    assert ops.run_algo(torch.randn(5, 64).half(), codes, codebooks, scales, b_vec, 8, "gemv").shape == (5, 64)
    assert len(calls) == 2  # 5 tokens: past MAX_TOKENS, the gemv
    fresh = idx.to(torch.uint8)  # one that only the table path saw (the gemv's launch may keep a view alive)
    ops.run_algo(x, fresh, codebooks, scales, b_vec, 8, "gemv")
    key = id(fresh)
    assert key in T._LAYER_CODES
    del fresh
    gc.collect()
    assert key not in T._LAYER_CODES


def test_dispatch_opt_in_takes_fused_layers(monkeypatch):
    """The fused op's gemv (q/k/v in one launch, lit_cb/fused.py) runs the table kernel when opted in, with the
    same result as the gemv it replaces (to fp16 rounding)."""
    ops = importlib.import_module("lit_cb.kernels.ops")
    sizes = [16, 8]
    layers = [layer(n, 32, 1, 8, 4, seed=20 + i) for i, n in enumerate(sizes)]
    codes = torch.cat([idx for idx, *_ in layers]).to(torch.uint8)
    codebooks = torch.stack([cb for _, cb, _, _ in layers])
    scales = torch.cat([s for _, _, s, _ in layers])
    x = torch.randn(1, 32, generator=torch.Generator().manual_seed(21)).half()
    monkeypatch.delenv(T.ENV_FLAG, raising=False)
    plain = ops.run_algo(x, codes, codebooks, scales, None, 8, "gemv", sizes)
    calls = []
    real = T.table_gemv
    monkeypatch.setattr(T, "table_gemv", lambda *a, **k: calls.append(k.get("part_sizes")) or real(*a, **k))
    monkeypatch.setenv(T.ENV_FLAG, "1")
    out = ops.run_algo(x, codes, codebooks, scales, None, 8, "gemv", sizes)
    assert calls == [sizes]
    assert ((out.float() - plain.float()).abs().max() / plain.float().abs().max()) < 3e-3


def test_dispatch_default_is_the_measured_shapes_and_the_flag_is_checked(monkeypatch):
    """Unset, LIT_CB_TABLE_GEMV leaves the choice to the measured rule: tables for several codebooks at the huge
    shape class only (28672x8192 2x8_g8 won the H100 sweep; 11008x4096 tied, one codebook lost), on CUDA; 0 and 1
    force it; anything else is refused with the value named before any launch."""
    ops = importlib.import_module("lit_cb.kernels.ops")
    assert (ops.shape_class(28672, 8192), True) in ops.TABLE_GEMV_SHAPES
    assert (ops.shape_class(28672, 8192), False) not in ops.TABLE_GEMV_SHAPES
    assert (ops.shape_class(11008, 4096), True) not in ops.TABLE_GEMV_SHAPES
    assert (ops.shape_class(4096, 11008), True) not in ops.TABLE_GEMV_SHAPES
    idx, codebooks, scales, _ = layer(64, 64, 2, 8, 8, seed=9)
    codes, x = idx.to(torch.uint8), torch.randn(1, 64).half()
    monkeypatch.delenv(T.ENV_FLAG, raising=False)
    assert T.forced() is None and not ops._table_gemv(x, codes, codebooks, 8)  # CPU, narrow: the gemv
    monkeypatch.setenv(T.ENV_FLAG, "0")
    assert T.forced() is False and not ops._table_gemv(x, codes, codebooks, 8)
    monkeypatch.setenv(T.ENV_FLAG, "1")
    assert ops._table_gemv(x, codes, codebooks, 8)
    monkeypatch.setenv(T.ENV_FLAG, "yes")
    with pytest.raises(ValueError, match="LIT_CB_TABLE_GEMV='yes'"):
        ops.run_algo(x, codes, codebooks, scales, None, 8, "gemv")
    assert T.layer_codes(codes).shape == (2 * 8 // T.DISPATCH_CHUNK, 64, T.DISPATCH_CHUNK)
