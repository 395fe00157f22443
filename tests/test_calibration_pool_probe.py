"""bench/calibration_pool_probe.py: the product's compression driver run on the first blocks only (the others
untouched and put back in order), teacher-text calibration windows built from a cache's sequences, and the
whole probe on the tiny model with its three pools, paired per seed."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from .conftest import TINY_RUN, load_script, tiny_llama, tiny_script_setup


def _probe():
    return load_script("bench/calibration_pool_probe.py")


def test_only_the_first_blocks_are_compressed_and_every_block_is_put_back():
    from lit_cb.compress import compress_model
    from lit_cb.config import load_config
    from lit_cb.layers import CodebookLinear
    from lit_cb.models import decoder_layers

    probe = _probe()
    model = tiny_llama(num_layers=3)
    before = [b for b in decoder_layers(model)]
    float_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = load_config(None, [f"{k}={v}" for k, v in TINY_RUN.items()])
    windows = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    with probe.truncated_to(model, 1):
        assert len(decoder_layers(model)) == 1
        compress_model(model, windows, cfg.compression, device="cpu", progress=False)
    assert [b for b in decoder_layers(model)] == before  # the same modules, in order
    assert sum(isinstance(m, CodebookLinear) for m in before[0].modules()) == 7
    for i in (1, 2):
        linears = [m for m in before[i].modules() if isinstance(m, nn.Linear)]
        assert len(linears) == 7 and not any(isinstance(m, CodebookLinear) for m in before[i].modules())
    for name, p in model.named_parameters():
        if not name.startswith("model.layers.0.") and name in float_weights:
            assert torch.equal(p, float_weights[name]), name
    # an error inside still puts the blocks back
    with pytest.raises(RuntimeError, match="boom"), probe.truncated_to(model, 2):
        raise RuntimeError("boom")
    assert [b for b in decoder_layers(model)] == before


def test_teacher_windows_join_whole_cached_sequences_chosen_by_the_seed(tmp_path):
    probe = _probe()
    cache = torch.arange(40 * 8).reshape(40, 8)  # 40 sequences of 8 tokens, every token distinct
    save_file({"input_ids": cache}, str(tmp_path / "tokens.safetensors"))
    w = probe.teacher_calibration(tmp_path, 5, 16, seed=3)
    assert w.shape == (5, 16) and w.dtype == torch.long
    rows = w.reshape(10, 8)
    picked = [int(r[0]) // 8 for r in rows]
    for r, i in zip(rows, picked, strict=True):
        assert torch.equal(r, cache[i])  # each half of a window is one whole cached sequence
    assert len(set(picked)) == 10  # drawn without replacement
    assert torch.equal(w, probe.teacher_calibration(tmp_path, 5, 16, seed=3))
    assert not torch.equal(w, probe.teacher_calibration(tmp_path, 5, 16, seed=4))
    with pytest.raises(ValueError, match="not a multiple"):
        probe.teacher_calibration(tmp_path, 5, 12, seed=0)
    with pytest.raises(ValueError, match="need 42 teacher sequences"):
        probe.teacher_calibration(tmp_path, 21, 16, seed=0)


def test_the_probe_compares_three_pools_per_seed_on_the_tiny_model(tmp_path, tiny_tokenizer):
    probe = _probe()
    model_dir, config, _ = tiny_script_setup(tmp_path, tiny_tokenizer)
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    ids = torch.randint(0, len(tiny_tokenizer), (64, 16), generator=torch.Generator().manual_seed(1))
    save_file({"input_ids": ids}, str(teacher / "tokens.safetensors"))
    out = tmp_path / "r.json"
    args = ["--config", str(config), "--blocks", "1", "--seeds", "0,1", "--eval-windows", "2", "--out", str(out)]
    args += ["--samplings", "document,concat,teacher", "--teacher-dir", str(teacher), f"model.name={model_dir}"]
    result = probe.main(args)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert set(result["per_seed"]) == {"0", "1"}
    for row in result["per_seed"].values():
        for pool in ("document", "concat", "teacher"):
            assert 1 < row[pool]["ppl"] < 1e6 and row[pool]["bits_per_weight"] > 0
    for pool in ("concat", "teacher"):
        diffs = result["summary"][f"{pool}_minus_document"]["per_seed"]
        expected = [r[pool]["ppl"] - r["document"]["ppl"] for r in result["per_seed"].values()]
        assert diffs == expected
        assert abs(result["summary"][f"{pool}_minus_document"]["mean"] - sum(expected) / 2) < 1e-9
    # nothing already on disk is overwritten; a bad pool is refused before any work
    with pytest.raises(SystemExit):
        probe.main(args)
    bad = ["--config", str(config), "--samplings", "documents", "--out", str(tmp_path / "x"), f"model.name={model_dir}"]
    with pytest.raises(SystemExit):
        probe.main(bad)
    assert not (tmp_path / "x").exists()
