"""Restoring finished blocks (a resumed compression, or a recovery from compression.blocks_from) runs a block's
calibration forward only where a block still to compress needs its outputs: a run whose blocks are all finished
loads them and computes nothing, and the model it ends with is the one compressed."""

from __future__ import annotations

import json

import torch

import lit_cb.compress as C
from lit_cb.compress import CompressionConfig, compress_model
from lit_cb.models import decoder_layers

from .conftest import tiny_llama

CFG = CompressionConfig(
    method="codebook", method_config={"in_group_size": 4, "nbits": 4, "kmeans_iters": 2}, forward_batch_size=4
)


def _windows() -> torch.Tensor:
    return torch.randint(0, 512, (4, 12), generator=torch.Generator().manual_seed(0))


def _calls(monkeypatch) -> dict:
    """Counts of the capture of block-0 inputs and of each block's forwards (by block index), through the real
    functions."""
    seen: dict = {"capture": 0, "forward": {}}
    run_block, capture = C.run_block, C.capture_block_inputs

    def counted_run_block(block, *args, **kwargs):
        seen["forward"][block.index] = seen["forward"].get(block.index, 0) + 1
        return run_block(block, *args, **kwargs)

    def counted_capture(*args, **kwargs):
        seen["capture"] += 1
        return capture(*args, **kwargs)

    monkeypatch.setattr(C, "run_block", counted_run_block)
    monkeypatch.setattr(C, "capture_block_inputs", counted_capture)
    return seen


def _fresh() -> torch.nn.Module:
    model = tiny_llama(num_layers=3)
    for i, block in enumerate(decoder_layers(model)):
        block.index = i
    return model


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_restored_blocks_run_forwards_only_to_feed_a_block_still_to_compress(tmp_path, monkeypatch):
    resume = tmp_path / "blocks"
    first = _fresh()
    compress_model(first, _windows(), CFG, device="cpu", progress=False, resume_dir=resume)

    seen = _calls(monkeypatch)
    again = _fresh()
    compress_model(again, _windows(), CFG, device="cpu", progress=False, resume_dir=resume)
    assert seen == {"capture": 0, "forward": {}}  # every block finished: loaded, nothing computed
    _same(first, again)

    # Interrupted before the last block: blocks 0 and 1 forward once each (to make block 2's inputs), block 2 is
    # compressed again from those inputs, and nothing runs after it.
    progress = json.loads((resume / "progress.json").read_text())
    del progress["blocks"]["2"]
    (resume / "progress.json").write_text(json.dumps(progress))
    (resume / "block_002.safetensors").unlink()
    seen["forward"].clear()
    partial = _fresh()
    compress_model(partial, _windows(), CFG, device="cpu", progress=False, resume_dir=resume)
    assert seen["capture"] == 1
    assert seen["forward"][0] == 1 and seen["forward"][1] == 1 and seen["forward"][2] >= 1, seen
    _same(first, partial)
