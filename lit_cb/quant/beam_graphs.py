"""CUDA graphs for AQLM's beam search (:func:`lit_cb.quant.aqlm.beam_search_codes`), opt-in: ``LIT_CB_GRAPH_BEAM=1``.

Why: one search pass is about 30 small tensor ops per input group (``bench/beam_search_bench.py --ops``), so on a
GPU a small model's layers (SmolLM2: 72-192 groups, 576-1536 rows) spend their time launching kernels, not running
them: AQLM's layer quantization took 428 s of a 761 s SmolLM2 compression on the H100, most of it in these
searches. Every decision inside a pass depends on shapes only (the beam's width, the block boundaries), never on
values, so one capture per shape replays exactly what an eager pass would run, with one launch.

A captured search is kept per shape (the layer's rows in the chunk, output group, width, codewords, dtype, beam,
block) and reused by every layer of that shape, which in a transformer is most of them: each call copies its
tensors into the capture's static inputs, replays, and clones the output. At most :data:`MAX_GRAPHS` are kept
(least recently used goes first), and only searches whose hypothesis state (``rows x beam x og x in`` floats)
is at most :data:`MAX_STATE_ELEMENTS`: larger layers are bound by their arithmetic, where graphs buy nothing and
each capture's memory pool would hold gigabytes.

Opt-in until ``bench/beam_search_bench.py --graphs`` has timed it on a GPU; the tests check the static-input
plumbing on the CPU with an eager stand-in for the capture.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable

import torch

ENV_FLAG = "LIT_CB_GRAPH_BEAM"
MAX_GRAPHS = 8
MAX_STATE_ELEMENTS = 2**26  # 256 MB of float32 hypothesis state


def enabled(like: torch.Tensor) -> bool:
    """Opted in (``LIT_CB_GRAPH_BEAM=1``) and on CUDA."""
    return os.environ.get(ENV_FLAG) == "1" and like.is_cuda


def cuda_capture(fn: Callable[..., torch.Tensor], static: tuple) -> tuple[Callable[[], None], torch.Tensor]:
    """Capture ``fn(*static)`` (after one warm-up run on a side stream, as CUDA graphs need): the replay and the
    output tensor it rewrites."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*static)
    return graph.replay, out


class _Captured:
    """One captured search: its static inputs, its replay and its output."""

    def __init__(self, fn: Callable[..., torch.Tensor], tensors: tuple, capture) -> None:
        self.static = tuple(t.detach().clone() for t in tensors)
        self.replay, self.out = capture(fn, self.static)

    def __call__(self, tensors: tuple) -> torch.Tensor:
        for dst, src in zip(self.static, tensors, strict=True):
            dst.copy_(src)
        self.replay()
        return self.out.clone()


_GRAPHS: OrderedDict[tuple, _Captured] = OrderedDict()


def run(fn: Callable[..., torch.Tensor], tensors: tuple, settings: tuple) -> torch.Tensor:
    """``fn(*tensors)`` through the capture kept for these tensors' shapes and ``settings`` (the non-tensor
    arguments ``fn`` closes over), captured on first use (by :func:`cuda_capture`)."""
    key = tuple((tuple(t.shape), t.dtype, t.device) for t in tensors) + tuple(settings)
    entry = _GRAPHS.get(key)
    if entry is None:
        entry = _Captured(fn, tensors, cuda_capture)
        _GRAPHS[key] = entry
        while len(_GRAPHS) > MAX_GRAPHS:
            _GRAPHS.popitem(last=False)
    else:
        _GRAPHS.move_to_end(key)
    return entry(tensors)
