"""``lit_cb evaluate`` on every kind of model it takes, against an independent perplexity: transformers'
own shifted cross-entropy (``labels=``) on the same windows, exp of the mean over windows."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lit_cb import cli
from lit_cb.compress import CompressionConfig, compress_model
from lit_cb.configs.data import DataConfig
from lit_cb.data.datamodule import CompressionDataModule
from lit_cb.interop.aqlm import export_aqlm
from lit_cb.serialization import load_compressed, save_compressed

from .conftest import tiny_llama

PROTOCOL = ["eval_seqlen=32", "max_eval_windows=3"]


def _reference(model, tokenizer) -> float:
    windows = CompressionDataModule(tokenizer, DataConfig(eval_seqlen=32, max_eval_windows=3)).test_windows()
    assert windows.shape == (3, 32)
    with torch.no_grad():
        losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in windows]
    return float(torch.tensor(losses, dtype=torch.float64).mean().exp())


def _evaluate(target, tmp_path, capsys) -> dict:
    out = tmp_path / "eval.json"
    assert cli.main(["evaluate", str(target), *PROTOCOL, f"output={out}"]) == 0, capsys.readouterr().err
    return json.loads(out.read_text())


def test_a_float_folder_is_measured_like_transformers_measures_it(tmp_path, tiny_tokenizer, capsys):
    folder = tmp_path / "float"
    tiny_llama(vocab=len(tiny_tokenizer)).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    result = _evaluate(folder, tmp_path, capsys)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert result["perplexity"] == pytest.approx(_reference(model, tiny_tokenizer), rel=1e-5)
    assert result["stored_ppl"] == {} and result["protocol"]["num_windows"] == 3


def test_an_aqlm_export_with_its_adapter_measures_as_the_lit_cb_folder(tmp_path, tiny_tokenizer, capsys):
    model = tiny_llama(vocab=len(tiny_tokenizer))
    windows = torch.randint(0, len(tiny_tokenizer), (4, 12), generator=torch.Generator().manual_seed(0))
    cfg = CompressionConfig(
        method="aqlm",
        method_config={
            "num_codebooks": 2,
            "nbits_per_codebook": 4,
            "in_group_size": 8,
            "max_epochs": 1,
            "beam_size": 2,
            "codebook_steps": 2,
            "init_kmeans_iters": 2,
        },
    )
    compress_model(model, windows, cfg, device="cpu", progress=False)
    gen = torch.Generator().manual_seed(1)
    model.model.layers[0].mlp.up_proj.add_low_rank(
        torch.randn(2, 64, generator=gen), torch.randn(128, 2, generator=gen)
    )
    lit_dir = save_compressed(model, tmp_path / "lit", tiny_tokenizer)
    export_aqlm(lit_dir, tmp_path / "aqlm")
    assert (tmp_path / "aqlm" / "lora").is_dir()
    lit_result, aqlm_result = _evaluate(lit_dir, tmp_path, capsys), _evaluate(tmp_path / "aqlm", tmp_path, capsys)
    reference = _reference(load_compressed(lit_dir)[0], tiny_tokenizer)
    assert lit_result["perplexity"] == pytest.approx(reference, rel=1e-5)
    assert aqlm_result["perplexity"] == pytest.approx(reference, rel=1e-5)  # the adapter was merged back


def test_the_embedded_model_is_measured_by_name(tmp_path, capsys):
    from lit_cb.models import load_model

    result = _evaluate("smollm2", tmp_path, capsys)
    model, tokenizer = load_model("smollm2", "float32", "cpu")
    assert result["perplexity"] == pytest.approx(_reference(model, tokenizer), rel=1e-4)
