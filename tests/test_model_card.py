"""The README.md (model card) every saved model folder gets: its figures are the folder's own, measured
by independent means, and its code runs as written."""

from __future__ import annotations

import re
import subprocess
import sys

import torch

from lit_cb.compress import CompressionConfig, compress_model
from lit_cb.serialization import bits_per_weight_on_disk, load_compressed, save_compressed

from .conftest import tiny_llama

EXTRA = {
    "run_config": {
        "run_name": "tiny_card",
        "model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct"},
        "compression": {"method": "codebook"},
        "data": {"eval_seqlen": 64, "max_eval_windows": 2},
    },
    "wikitext2_ppl": {"float": 21.6104, "compressed": 72.5123, "recovered": 46.1149},
}


def _saved(tmp_path, tokenizer, extra=EXTRA):
    model = tiny_llama(vocab=len(tokenizer))
    windows = torch.randint(0, len(tokenizer), (4, 12), generator=torch.Generator().manual_seed(0))
    cfg = CompressionConfig(method="codebook", method_config={"in_group_size": 4, "nbits": 4, "kmeans_iters": 2})
    compress_model(model, windows, cfg, device="cpu", progress=False)
    model.model.layers[1].mlp.down_proj.add_low_rank(torch.randn(2, 128), torch.randn(64, 2))
    return save_compressed(model, tmp_path / "model", tokenizer, extra=extra)


def test_the_card_states_the_folders_own_figures(tmp_path, tiny_tokenizer):
    folder = _saved(tmp_path, tiny_tokenizer)
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "- codebook" in card
    assert card.count("\n---\n") == 1  # the front matter closes once
    assert "# tiny_card" in card
    # 2 blocks x 7 linears, all 1x4 g4; one of them carries a rank-2 slot
    assert "14 x CodebookLinear 1x4 g4; low-rank slots holding merged LoRA adapters (rank 2 in 16 bits: 1)" in card
    bits = bits_per_weight_on_disk(folder)
    assert f"**{bits['compressed_linears']:.3f}** over the compressed linears" in card
    assert f"{bits['whole_model']:.3f} over the whole model" in card
    assert "windows of 64 tokens, the first 2" in card
    assert "| float | compressed | recovered |" in card and "| 21.61 | 72.51 | 46.11 |" in card
    load_compressed(folder)  # the manifest, written last, covers the card


def test_a_folder_saved_without_run_information_still_gets_a_card(tmp_path, tiny_tokenizer):
    card = (_saved(tmp_path, tiny_tokenizer, extra=None) / "README.md").read_text()
    assert "# model" in card and "as the saving run measured it" not in card and "base_model" not in card


def test_the_cards_python_runs_as_written(tmp_path, tiny_tokenizer):
    folder = _saved(tmp_path, tiny_tokenizer)
    code = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S).group(1)
    check = "\nassert type(model.model.layers[0].self_attn.q_proj).__name__ == 'CodebookLinear'\n"
    proc = subprocess.run([sys.executable, "-c", code + check], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
