"""Fused layers (q/k/v, gate/up as one CodebookLinear-like layer and one launch), split-K and the L2-chunked
prefill path: kernels under the Triton CPU interpreter against float64, the fused layer against the
separate layers, and generation with a fused tiny Llama against the unfused one."""

from __future__ import annotations

import pytest
import torch

from lit_cb.fused import (
    FusedCodebookLinear,
    FusedSlice,
    fuse_projections,
    unfuse_projections,
)
from lit_cb.layers import CodebookLinear
from tests.conftest import tiny_llama
from tests.test_kernels import (  # noqa: F401  (_poison_empty: NaN-filled outputs catch unwritten elements)
    DISPATCH,
    OPS,
    TOL,
    K,
    _fmt,
    _poison_empty,
    random_layer,
    reference_weight,
    rel_err,
)

# (M, B, g, in, [rows per part], bias): packed 2x8 words, 1x8 g4, int16 1x16; parts not multiples of blocks
FUSED_FORMATS = [
    (2, 8, 8, 40, [7, 5, 5], True),
    (1, 8, 4, 52, [9, 13], False),
    (1, 16, 8, 24, [3, 1, 6, 2], True),
]


def _fused_parts(m, b, g, k, sizes, bias, gen):
    """Per-part random layers and their stacked kernel tensors plus the float64 dense W and bias."""
    parts = [random_layer(_fmt(m, b, g, k, n, bias), gen) for n in sizes]
    codes = torch.cat([p[1] for p in parts])
    codebooks = torch.stack([p[2] for p in parts])
    scales = torch.cat([p[3] for p in parts])
    w = torch.cat([reference_weight(p[0], p[2], p[3]) for p in parts])
    bias_t = torch.cat([p[4] for p in parts]) if bias else None
    return codes, codebooks, scales, bias_t, w


def _ref(x, w, bias):
    y = x.double() @ w.T
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("spec", FUSED_FORMATS, ids=lambda s: f"{s[0]}x{s[1]}_g{s[2]}_{len(s[4])}parts")
def test_fused_kernels_match_float64(spec):
    m, b, g, k, sizes, bias = spec
    gen = torch.Generator().manual_seed(sum(sizes) * 7 + m)
    codes, codebooks, scales, bias_t, w = _fused_parts(m, b, g, k, sizes, bias, gen)
    for tokens in (1, 3):
        x = torch.randn(tokens, k, generator=gen).half()
        ref = _ref(x, w, bias_t)
        cfg = K.GemvConfig(block_n=4, block_g=4, num_warps=1, num_stages=1)  # blocks straddle part boundaries
        y = K.codebook_gemv(x, codes, codebooks, scales, bias_t, b, cfg, part_sizes=sizes)
        assert rel_err(y, ref) < TOL[torch.float16], ("gemv", tokens)
        for split_k in (1, 2):
            cfg = K.MMConfig(block_m=16, block_n=16, block_g=16 // g, num_warps=1, num_stages=1, split_k=split_k)
            y = K.codebook_mm(x, codes, codebooks, scales, bias_t, b, cfg, part_sizes=sizes)
            assert rel_err(y, ref) < TOL[torch.float16], ("mm", tokens, split_k)
    wq = K.codebook_dequant(
        codes, codebooks, scales, b, torch.float16, K.DequantConfig(block_n=4, block_g=4, num_warps=1), sizes
    )
    assert rel_err(wq, w) < 1e-3


@pytest.mark.parametrize("spec", [(2, 8, 8, 200, 33, True), (1, 8, 4, 104, 9, False)], ids=["2x8_g8", "1x8_g4"])
@pytest.mark.parametrize("tokens", [1, 5])
def test_mm_split_k_matches_float64(spec, tokens):
    """Splits that do not divide the K tiles evenly (25 or 26 groups in tiles of 2 or 4), ragged rows."""
    gen = torch.Generator().manual_seed(tokens * 13 + spec[3])
    fmt = _fmt(*spec)
    idx, codes, codebooks, scales, bias = random_layer(fmt, gen)
    x = torch.randn(tokens, fmt.in_features, generator=gen).half()
    ref = _ref(x, reference_weight(idx, codebooks, scales), bias)
    for split_k in (2, 3, 64):  # 64: more splits than K tiles, clamped
        cfg = K.MMConfig(block_m=16, block_n=16, block_g=16 // fmt.in_group_size, num_warps=1, split_k=split_k)
        y = K.codebook_mm(x, codes, codebooks, scales, bias, fmt.nbits_per_codebook, cfg)
        assert rel_err(y, ref) < TOL[torch.float16], split_k


def test_dense_chunked_matches_float64():
    gen = torch.Generator().manual_seed(4)
    fmt = _fmt(2, 8, 8, 40, 23, True)
    idx, codes, codebooks, scales, bias = random_layer(fmt, gen)
    x = torch.randn(6, fmt.in_features, generator=gen).float()
    ref = _ref(x, reference_weight(idx, codebooks, scales), bias)
    for rows in (5, 23, 1000):  # a ragged last chunk, one exact chunk, one chunk larger than the layer
        y = K.codebook_dense_chunked(x, codes, codebooks, scales, bias, 8, K.DequantConfig(4, 4, 1), rows)
        assert rel_err(y, ref) < TOL[torch.float16], rows


def test_split_k_heuristic_fills_the_gpu_only_for_narrow_outputs():
    # up to 16 tokens the sweep's tiles split 4 ways on every shape class (kernels_sweep_h100.json)
    assert OPS._mm_config(16, 4096, 4096, 8, 512, 132).split_k == 4
    assert OPS._mm_config(16, 11008, 4096, 8, 512, 132).split_k == 4
    # 17-64 tokens, 64x64 tiles: 4096 rows give 64 row tiles for 132 SMs -> split; 28672 rows: 448 -> none
    assert OPS._mm_config(32, 4096, 4096, 8, 512, 132).split_k > 1
    assert OPS._mm_config(32, 28672, 8192, 8, 1024, 132).split_k == 1
    assert OPS._mm_config(2048, 4096, 4096, 8, 512, 132).split_k == 1


def test_bad_part_sizes_are_refused():
    gen = torch.Generator().manual_seed(0)
    codes, codebooks, scales, _, _ = _fused_parts(1, 8, 4, 16, [3, 4], False, gen)
    x = torch.randn(1, 16).half()
    with pytest.raises(ValueError, match=r"part_sizes=\[3, 3\] must give 2 positive row counts summing to 7"):
        K.codebook_gemv(x, codes, codebooks, scales, None, 8, part_sizes=[3, 3])
    with pytest.raises(ValueError, match="part_sizes"):
        K.codebook_gemv(x, codes, codebooks[0], scales, None, 8, part_sizes=[3, 4])


# ------------------------------------------------------------------------------------- the fused layer


def _layer(fmt, gen, rank=0):
    idx, _, codebooks, scales, bias = random_layer(fmt, gen, dtype=torch.float32)
    layer = CodebookLinear.from_tensors(fmt, idx, codebooks, scales, bias, dtype=torch.float32)
    if rank:
        layer.add_low_rank(torch.randn(rank, fmt.in_features, generator=gen), torch.randn(fmt.out_features, rank))
    return layer


def _qkv(gen, bias=(True, False, True), ranks=(0, 2, 0)):
    sizes = (12, 4, 4)
    return [_layer(_fmt(2, 8, 8, 32, n, b), gen, r) for n, b, r in zip(sizes, bias, ranks, strict=True)]


def test_fused_layer_equals_concatenated_layers_reference_and_kernels():
    gen = torch.Generator().manual_seed(1)
    layers = _qkv(gen)
    fused = FusedCodebookLinear(layers)
    assert fused.part_sizes == [12, 4, 4] and fused.codebooks.shape == (3, 2, 256, 1, 8)
    x = torch.randn(2, 3, 32, generator=gen)
    expected = torch.cat([layer(x) for layer in layers], dim=-1)
    torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)  # the PyTorch reference path
    dense = torch.cat([layer.dequantize() for layer in layers]).double()
    torch.testing.assert_close(fused.dequantize().double(), dense)
    with DISPATCH.interpreter_on_cpu():
        for tokens in (1, 5, 100):  # gemv, mm, dense through torch.ops.lit_cb.codebook_linear_fused
            xt = torch.randn(tokens, 32, generator=gen)
            y = fused(xt)
            ref = (
                xt.double() @ dense.T
                + torch.cat([layer.bias if layer.bias is not None else torch.zeros(4) for layer in layers]).double()
            )
            assert rel_err(y, ref) < TOL[torch.float32], tokens


def test_unfuse_restores_the_layers_exactly():
    gen = torch.Generator().manual_seed(2)
    layers = _qkv(gen)
    restored = FusedCodebookLinear(layers).unfuse()
    for a, b in zip(layers, restored, strict=True):
        assert a.fmt == b.fmt and a.rank == b.rank
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


def test_incompatible_layers_are_refused():
    gen = torch.Generator().manual_seed(3)
    with pytest.raises(ValueError, match="formats differ"):
        FusedCodebookLinear([_layer(_fmt(2, 8, 8, 32, 4, False), gen), _layer(_fmt(1, 8, 4, 32, 4, False), gen)])
    with pytest.raises(ValueError, match="1 layers"):
        FusedCodebookLinear([_layer(_fmt(2, 8, 8, 32, 4, False), gen)])
    with pytest.raises(ValueError, match="2 to 4"):
        fuse_projections(torch.nn.Linear(2, 2), groups=[("q",)])


def test_slices_compute_the_fused_output_once_per_input():
    gen = torch.Generator().manual_seed(4)
    parent = torch.nn.Module()
    parent.q, parent.k, parent.v = _qkv(gen)
    x = torch.randn(2, 32, generator=gen)
    expected = [parent.q(x), parent.k(x), parent.v(x)]
    assert fuse_projections(parent, groups=[("q", "k", "v")]) == 1
    assert isinstance(parent.k, FusedSlice) and isinstance(parent.fused_q_k_v, FusedCodebookLinear)
    calls = []
    parent.fused_q_k_v.register_forward_hook(lambda *a: calls.append(1))
    for _ in range(2):
        outs = [parent.v(x), parent.q(x), parent.k(x)]  # any order
        for got, want in zip(outs, expected[2:] + expected[:2], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(calls) == 2  # once per round of q/k/v
    x2 = x + 1
    torch.testing.assert_close(
        parent.q(x2),
        torch.nn.functional.linear(x2, parent.fused_q_k_v.dequantize()[:12]) + parent.fused_q_k_v.bias[:12],
        rtol=1e-4,
        atol=1e-4,
    )
    calls.clear()
    parent.k(x2)  # served from q(x2)'s fused output
    assert len(calls) == 0
    parent.q(x)  # a different input: computed
    x.add_(1.0)  # the same tensor changed in place: its version moved, so k recomputes
    y = parent.k(x)
    assert len(calls) == 2
    torch.testing.assert_close(y, parent.fused_q_k_v(x)[:, 12:16])
    assert unfuse_projections(parent) == 1
    assert isinstance(parent.q, CodebookLinear) and not hasattr(parent, "fused_q_k_v")


def _compressed_tiny_llama(vocab: int):
    """A tiny Llama with every projection a random 2x8 g8 CodebookLinear (no k-means needed for this)."""
    model = tiny_llama(num_layers=2, vocab=vocab).float().eval()
    gen = torch.Generator().manual_seed(0)
    for block in model.model.layers:
        for parent, names in (
            (block.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
            (block.mlp, ("gate_proj", "up_proj", "down_proj")),
        ):
            for name in names:
                lin = getattr(parent, name)
                fmt = _fmt(2, 8, 8, lin.in_features, lin.out_features, lin.bias is not None)
                layer = _layer(fmt, gen)
                layer.codebooks.data *= 0.5
                setattr(parent, name, layer)
    return model


def test_generation_with_fused_projections_matches_unfused(tiny_tokenizer):
    from lit_cb.generate import generate

    model = _compressed_tiny_llama(len(tiny_tokenizer))
    model.generation_config.eos_token_id = None
    ids = torch.randint(0, len(tiny_tokenizer), (2, 6), generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain, _ = generate(model, tiny_tokenizer, ids, max_new_tokens=8, compile_backend="graph")
    assert fuse_projections(model) == 4  # q/k/v and gate/up in each of 2 blocks
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, FusedSlice) and attn.fused_q_proj_k_proj_v_proj.part_sizes[0] == 64
    fused, _ = generate(model, tiny_tokenizer, ids, max_new_tokens=8, compile_backend="graph")
    assert torch.equal(fused, plain)
    assert unfuse_projections(model) == 4
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_sweep_script_smoke_runs_and_writes_its_json(tmp_path):
    """bench/kernels_sweep_gpu.py --smoke (the H100 script at tiny CPU shapes), as its own process."""
    import json
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    out = tmp_path / "sweep.json"
    cmd = [sys.executable, "bench/kernels_sweep_gpu.py", "--smoke", "--phases", "layers,fused,decode,aqlm"]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert {"device", "versions", "date", "command", "summary"} <= set(doc)
    assert "phase_errors" not in doc and doc["aqlm_skipped"]
    assert doc["layers"] and all("us" in r for r in doc["layers"]), [r for r in doc["layers"] if "us" not in r]
    assert {r["group"] for r in doc["fused"]} == {"qkv", "gate_up"} and all("speedup" in r for r in doc["fused"])
    variants = {r["variant"] for r in doc["decode_7b"] if "tok_s" in r}
    assert variants == {"fp16", "floor_no_projections", "2x8_g8", "2x8_g8+fused", "1x8_g4", "1x8_g4+fused"}


def test_prefill_bench_smoke_checks_every_variant_against_float64(tmp_path):
    """bench/prefill_bench.py --smoke (the H100 script's float64 check at toy CPU sizes), as a process: every
    variant (dense, chunks in turn, chunks on a side stream) is checked and recorded; a wrong one fails it."""
    import json
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    out = tmp_path / "prefill.json"
    cmd = [sys.executable, "bench/prefill_bench.py", "--smoke", "--out", str(out)]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["passed"] and {"device", "versions", "date", "command"} <= set(doc)
    assert {c["variant"] for c in doc["check"]} == {"dense", "chunked4_in_turn", "overlap2", "overlap4", "overlap8"}
    assert all(c["max_rel_error"] < 2e-3 for c in doc["check"])
