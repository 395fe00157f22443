"""``lit_cb generate`` (lit_cb.generate.main) against transformers' own generate on the same model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_cb.compress import CompressionConfig, compress_model
from lit_cb.generate import encode_prompt, generate, main
from lit_cb.kernels import dispatch
from lit_cb.layers import CodebookFormat, CodebookLinear
from lit_cb.serialization import save_compressed

from .conftest import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "the state of the school and the"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(tokenizer):
    model = tiny_llama(num_layers=2, vocab=len(tokenizer))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


@pytest.fixture(scope="module")
def compressed_dir(tmp_path_factory, tiny_tokenizer):
    model = _tiny(tiny_tokenizer)
    windows = torch.randint(0, len(tiny_tokenizer), (6, 12), generator=torch.Generator().manual_seed(0))
    cfg = CompressionConfig(method="codebook", method_config={"in_group_size": 4, "nbits": 4, "kmeans_iters": 2})
    compress_model(model, windows, cfg, device="cpu", progress=False)
    return save_compressed(model, tmp_path_factory.mktemp("gen") / "model", tiny_tokenizer)


@pytest.fixture(scope="module")
def trellis_dir(tmp_path_factory, tiny_tokenizer):
    """The tiny model compressed with the computed-codes trellis (its q/k/v and gate/up share one rotated input
    under lit_cb generate's shared_rotations)."""
    model = _tiny(tiny_tokenizer)
    windows = torch.randint(0, len(tiny_tokenizer), (6, 12), generator=torch.Generator().manual_seed(0))
    cfg = CompressionConfig(method="trellis", method_config={"state_bits": 6, "tile_rows": 16, "tile_cols": 8})
    compress_model(model, windows, cfg, device="cpu", progress=False)
    return save_compressed(model, tmp_path_factory.mktemp("gen_trellis") / "model", tiny_tokenizer)


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("float") / "model"
    _tiny(tiny_tokenizer).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _reference(folder: Path, prompt: str, max_new_tokens: int, **sampling) -> str:
    """transformers' generate on the model as from_pretrained loads it (greedy unless sampling is given)."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if sampling:
        torch.manual_seed(sampling.pop("seed"))
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=bool(sampling), **sampling
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("which", ["compressed", "trellis", "float"])
def test_greedy_output_equals_transformers_generate(which, compressed_dir, trellis_dir, float_dir, capsys):
    folder = {"compressed": compressed_dir, "trellis": trellis_dir, "float": float_dir}[which]
    rc = main([str(folder), "--prompt", PROMPT, "--max-new-tokens", "12"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    expected = _reference(folder, PROMPT, 12)
    assert len(expected.split()) >= 6  # a real continuation, not an immediate end of sequence
    assert out.out == expected + "\n"
    assert "prefill: 7 tokens" in out.err and "decode: 11 tokens" in out.err and "[eager]" in out.err


@pytest.mark.parametrize("which", ["compressed", "trellis"])
def test_fused_projections_give_the_same_greedy_output(which, compressed_dir, trellis_dir, capsys, monkeypatch):
    """--fuse on: q/k/v and gate/up run as fused layers (lit_cb.fused: codebook and trellis), same tokens as
    transformers on the unfused model."""
    import lit_cb.fused

    folder = {"compressed": compressed_dir, "trellis": trellis_dir}[which]
    fused_groups = []
    real = lit_cb.fused.fuse_projections
    monkeypatch.setattr(lit_cb.fused, "fuse_projections", lambda m: fused_groups.append(real(m)))
    rc = main([str(folder), "--prompt", PROMPT, "--max-new-tokens", "12", "--fuse", "on"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert fused_groups == [4]  # q/k/v and gate/up in each of the 2 blocks
    assert out.out == _reference(folder, PROMPT, 12) + "\n"


def test_sampling_is_seeded_and_matches_transformers(compressed_dir, capsys):
    args = [str(compressed_dir), "--prompt", PROMPT, "--max-new-tokens", "10", "--temperature", "1.3", "--top-p", "0.9"]
    texts = []
    for seed in ("5", "5", "6"):
        assert main([*args, "--seed", seed, "--no-stream"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] != texts[2]
    expected = _reference(compressed_dir, PROMPT, 10, temperature=1.3, top_p=0.9, top_k=0, seed=5)
    assert texts[0] == expected + "\n"


def test_chat_template_is_used_when_the_tokenizer_has_one(tiny_tokenizer):
    tok = tiny_tokenizer
    plain = encode_prompt(tok, PROMPT)
    assert plain.tolist() == [tok(PROMPT).input_ids]
    tok.chat_template = (
        "{% for m in messages %}school {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}of{% endif %}"
    )
    try:
        templated = encode_prompt(tok, PROMPT)
        assert tok.decode(templated[0]) == f"school {PROMPT} of"
        assert encode_prompt(tok, PROMPT, chat_template=False).tolist() == plain.tolist()
    finally:
        tok.chat_template = None


def test_stats_count_prefill_and_decode_tokens(compressed_dir):
    model = AutoModelForCausalLM.from_pretrained(compressed_dir)
    tokenizer = AutoTokenizer.from_pretrained(compressed_dir)
    ids = encode_prompt(tokenizer, PROMPT)
    new, stats = generate(model, tokenizer, ids, max_new_tokens=5)
    assert new.shape == (1, 5)
    assert (stats.prompt_tokens, stats.decode_tokens) == (7, 4)
    assert stats.prefill_seconds > 0 and stats.decode_seconds > 0
    assert stats.decode_tok_s == pytest.approx(4 / stats.decode_seconds)


def test_embedded_smollm2_generates_with_its_chat_template(capsys):
    from lit_cb.models import load_model

    rc = main(["smollm2", "--prompt", "What is 2+2?", "--max-new-tokens", "4"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    model, tokenizer = load_model("smollm2")
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )["input_ids"]
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert out.out == tokenizer.decode(ref[0, ids.shape[1] :], skip_special_tokens=True) + "\n"
    assert f"prefill: {ids.shape[1]} tokens" in out.err


@pytest.mark.parametrize(
    "argv,match",
    [
        (["/nonexistent/model", "--prompt", "x"], "no such folder"),
        (["{tmp}", "--prompt", "x"], "config.json is missing"),
        (["{compressed}", "--prompt", "x", "--device", "cuda"], "torch sees none"),
        (["{compressed}", "--prompt", "x", "--device", "tpu9"], "not a device"),
        (["{compressed}", "--prompt", " "], "--prompt is empty"),
    ],
)
def test_bad_inputs_get_clear_errors(argv, match, compressed_dir, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, compressed=compressed_dir) for a in argv]
    assert main(argv) == 1
    assert match in capsys.readouterr().err


def test_an_empty_prompt_is_refused_before_the_model_loads(monkeypatch, capsys):
    import lit_cb.generate

    monkeypatch.setattr(lit_cb.generate, "load", lambda *a: pytest.fail("the model was loaded"))
    assert main(["smollm2", "--prompt", "  "]) == 1
    assert "--prompt is empty" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag,value", [("--top-p", "0"), ("--top-p", "1.5"), ("--temperature", "-1"), ("--max-new-tokens", "0")]
)
def test_bad_numbers_are_refused_by_the_parser(flag, value, compressed_dir, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(compressed_dir), "--prompt", "x", flag, value])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize(
    "command,options",
    [("generate", ["--temperature", "--max-new-tokens"]), ("chat", ["--system", "/reset", "--temperature"])],
)
def test_help_is_fast_and_imports_no_torch(command, options):
    code = (
        f"import sys\nfrom lit_cb.{command} import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert all(option in proc.stdout for option in options), proc.stdout


def test_compiled_static_cache_decoding_matches_eager(compressed_dir):
    """The --compile path end to end on a CPU: transformers' static cache and a fullgraph torch.compile of
    the decode step (cudagraphs backend; the graphs themselves need a GPU, the trace does not)."""
    import torch._dynamo

    model = AutoModelForCausalLM.from_pretrained(compressed_dir)
    tokenizer = AutoTokenizer.from_pretrained(compressed_dir)
    ids = encode_prompt(tokenizer, PROMPT)
    eager, _ = generate(model, tokenizer, ids, max_new_tokens=8)
    warnings = []
    torch._dynamo.reset()
    compiled, stats = generate(
        model, tokenizer, ids, max_new_tokens=8, compile_backend="cudagraphs", warn=warnings.append
    )
    torch._dynamo.reset()
    assert warnings == [] and stats.compile_backend == "cudagraphs"
    assert torch.equal(compiled, eager)


@pytest.mark.parametrize("tokens", [1, 5, 100])  # gemv, mm, dense
def test_kernel_path_compiles_to_one_graph_without_breaks(tokens):
    """What CodebookLinear.forward runs on a GPU (select the kernel, call the custom op), traced by
    dynamo under the Triton CPU interpreter: one graph, no breaks, the same output as eager."""
    import torch._dynamo

    fmt = CodebookFormat(in_features=64, out_features=32, in_group_size=8, num_codebooks=2, nbits_per_codebook=8)
    layer = CodebookLinear(fmt)
    layer.codes.copy_(torch.randint(0, 256, layer.codes.shape, generator=torch.Generator().manual_seed(0)))
    layer.codebooks.data.normal_(0, 0.1)

    def kernel_path(x):  # CodebookLinear.forward's GPU branch, import included (CPU tensors never take it)
        from lit_cb.kernels import dispatch

        kernel = dispatch.select_kernel(layer.fmt, x)
        return kernel(x, layer.codes, layer.codebooks, layer.scales, layer.bias, layer.fmt)

    x = torch.randn(1, tokens, 64, dtype=torch.float16)
    with dispatch.interpreter_on_cpu():
        eager = kernel_path(x)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(kernel_path)(x)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
        assert "torch.ops.lit_cb.codebook_linear" in explained.graphs[0].code
        compiled = torch.compile(kernel_path, fullgraph=True, backend="aot_eager")(x)
    torch._dynamo.reset()
    assert torch.equal(compiled, eager)
    torch.testing.assert_close(eager.float(), x.float() @ layer.dequantize().float().T, rtol=2e-2, atol=2e-2)


def test_bench_generate_smoke_runs_and_writes_its_json(tmp_path):
    """bench/generate.py --smoke (the H100 benchmark at tiny CPU shapes), as its own process."""
    import json

    out = tmp_path / "generate.json"
    rows = "smollm2_fp16,smollm2_codebook,llama7b_1x8_g4"
    cmd = [sys.executable, "bench/generate.py", "--smoke", "--rows", rows, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {"device", "versions", "date", "command"} <= set(result) and "transformers" in result["versions"]
    assert list(result["rows"]) == rows.split(",")
    for name, row in result["rows"].items():
        assert "error" not in row, (name, row)
        assert [r["batch"] for r in row["results"]] == [1, 2]
        for r in row["results"]:
            assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["new_tokens"] == 6
            # the default decode path, the graph loop, run eagerly on a CPU
            assert (r["compile"], r["compile_backend"], r["warnings"]) == ("graph", "graph-eager", [])


def _lively(tokenizer):
    """The tiny model with its matrices scaled up: random small models otherwise repeat one token, which
    would hide a wrong cache position or mask."""
    model = _tiny(tokenizer)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(20)
    return model


@pytest.fixture(scope="module")
def lively_dirs(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    """Folders of the lively model: float, and codebook-compressed (loaded back through the quantizer)."""
    root = tmp_path_factory.mktemp("lively")
    _lively(tiny_tokenizer).save_pretrained(root / "float")
    tiny_tokenizer.save_pretrained(root / "float")
    model = _lively(tiny_tokenizer)
    windows = torch.randint(0, len(tiny_tokenizer), (6, 12), generator=torch.Generator().manual_seed(0))
    cfg = CompressionConfig(method="codebook", method_config={"in_group_size": 4, "nbits": 4, "kmeans_iters": 2})
    compress_model(model, windows, cfg, device="cpu", progress=False)
    return {"float": root / "float", "compressed": save_compressed(model, root / "compressed", tiny_tokenizer)}


def _graph_loop_vs_generate(folder: Path, prompts: list[str], max_new_tokens: int):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(prompts, return_tensors="pt").input_ids  # equal-length prompts: no padding
    ours, stats = generate(model, tokenizer, ids, max_new_tokens=max_new_tokens, compile_backend="graph", capture=False)
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return ours, ref[:, ids.shape[1] :], stats, model, tokenizer, ids


@pytest.mark.parametrize("which", ["compressed", "float"])
@pytest.mark.parametrize("batch", [1, 2])
def test_graph_loop_greedy_equals_transformers_generate(which, batch, lively_dirs, tiny_tokenizer):
    """lit_cb's static-cache decode loop (what --compile graph captures and replays on a GPU), run eagerly on
    a CPU: the same greedy tokens as transformers' generate, row by row."""
    prompts = [PROMPT, "of the school and the state of"][:batch]
    assert len({len(tiny_tokenizer(p).input_ids) for p in prompts}) == 1
    ours, ref, stats, *_ = _graph_loop_vs_generate(lively_dirs[which], prompts, 12)
    assert ours.shape == (batch, 12) and torch.equal(ours, ref)
    assert all(len(set(row.tolist())) >= 6 for row in ref)  # real continuations, not one repeated token
    assert stats.compile_backend == "graph-eager" and "[static cache loop, eager]" in stats.summary()
    assert (stats.prompt_tokens, stats.decode_tokens) == (7 * batch, 11 * batch)


def test_graph_loop_stops_at_end_of_sequence_like_generate(lively_dirs):
    """With an end-of-sequence id that the greedy continuation hits, the loop stops (and pads finished rows)
    exactly where transformers' generate does."""
    model = AutoModelForCausalLM.from_pretrained(lively_dirs["compressed"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(lively_dirs["compressed"])
    ids = tokenizer([PROMPT, "of the school and the state of"], return_tensors="pt").input_ids
    free = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    eos = int(free[0, ids.shape[1] + 3])  # row 0's 4th new token ends row 0
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    ours, _ = generate(model, tokenizer, ids, max_new_tokens=12, compile_backend="graph", capture=False)
    assert ref.shape[1] - ids.shape[1] < 12 or (ref[:, ids.shape[1] :] == tokenizer.pad_token_id).any()
    assert torch.equal(ours, ref[:, ids.shape[1] :])


def test_graph_loop_sampling_is_seeded(lively_dirs):
    model = AutoModelForCausalLM.from_pretrained(lively_dirs["compressed"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(lively_dirs["compressed"])
    ids = tokenizer([PROMPT, PROMPT], return_tensors="pt").input_ids
    runs = [
        generate(model, tokenizer, ids, 10, temperature=1.3, top_p=0.9, seed=s, compile_backend="graph", capture=False)[
            0
        ]
        for s in (5, 5, 6)
    ]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert not torch.equal(runs[0][0], runs[0][1])  # the two rows draw independently
    greedy, _ = generate(model, tokenizer, ids, 10, compile_backend="graph", capture=False)
    assert not torch.equal(runs[0], greedy)


def test_graph_top_p_keeps_the_smallest_top_set():
    """_pick's nucleus: probabilities 0.5, 0.3, 0.15, 0.05 with top_p 0.7 keep exactly the first two."""
    from lit_cb.generate import _pick

    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(4000, -1)
    drawn = _pick(logits, 1.0, 0.7, torch.Generator().manual_seed(0))
    counts = torch.bincount(drawn, minlength=4).float() / 4000
    assert counts[2:].sum() == 0
    assert counts[0] == pytest.approx(0.5 / 0.8, abs=0.03)
    assert torch.equal(_pick(logits[:1], 0.0, 1.0, None), torch.tensor([0]))


def test_compile_graph_on_cpu_warns_and_runs_the_loop_eagerly(compressed_dir, capsys):
    rc = main([str(compressed_dir), "--prompt", PROMPT, "--max-new-tokens", "12", "--compile", "graph"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "CUDA graphs need a GPU" in out.err and "[static cache loop, eager]" in out.err
    assert out.out == _reference(compressed_dir, PROMPT, 12) + "\n"  # streamed, same text as generate's
