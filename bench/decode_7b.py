"""End-to-end decode speed of a LLaMA-7B-shaped decoder (random weights) with every linear of every block
compressed, beside fp16 and bitsandbytes NF4.

    python bench/decode_7b.py --batches 1,16 --out bench/results/decode_7b_h100.json

The model is a minimal LLaMA written here (RMSNorm, rotary attention over a preallocated KV cache through
SDPA, SwiGLU MLP) with LLaMA-7B's shapes: 32 blocks, hidden 4096, MLP 11008, 32 heads, vocab 32000. Only
the seven projections per block are swapped (fp16 ``nn.Linear`` / NF4 / ``CodebookLinear``); embedding and
lm_head stay fp16 in every variant, as AQLM and NF4 checkpoints keep them. One decode step (one new token
per sequence at context ``--context``) is captured as a CUDA graph and replayed; tokens/s = batch / step.
Values do not change the speed, so no checkpoint is needed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import pathlib
import statistics
import sys

import torch
import torch.nn.functional as F
from torch import nn

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

HIDDEN, MLP, LAYERS, HEADS, VOCAB = 4096, 11008, 32, 32, 32000
FORMATS = {"2x8_g8": (2, 8, 8), "1x8_g4": (1, 8, 4)}  # (M, B, g); 1x8 g4 is the LLM-Codebook default


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, 1e-6)


class Block(nn.Module):
    def __init__(self, make_linear, batch: int, max_len: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (make_linear(HIDDEN, HIDDEN) for _ in range(4))
        self.gate, self.up = make_linear(HIDDEN, MLP), make_linear(HIDDEN, MLP)
        self.down = make_linear(MLP, HIDDEN)
        self.n1, self.n2 = RMSNorm(HIDDEN), RMSNorm(HIDDEN)
        hd = HIDDEN // HEADS
        self.register_buffer("k_cache", torch.randn(batch, HEADS, max_len, hd) * 0.1)
        self.register_buffer("v_cache", torch.randn(batch, HEADS, max_len, hd) * 0.1)

    def forward(self, x: torch.Tensor, pos: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        h = self.n1(x)
        hd = HIDDEN // HEADS
        q = self.q(h).view(b, 1, HEADS, hd).transpose(1, 2)
        k = self.k(h).view(b, 1, HEADS, hd).transpose(1, 2)
        v = self.v(h).view(b, 1, HEADS, hd).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        self.k_cache[:, :, pos : pos + 1] = k
        self.v_cache[:, :, pos : pos + 1] = v
        att = F.scaled_dot_product_attention(q, self.k_cache[:, :, : pos + 1], self.v_cache[:, :, : pos + 1])
        x = x + self.o(att.transpose(1, 2).reshape(b, 1, HIDDEN))
        h = self.n2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Llama7BShaped(nn.Module):
    def __init__(self, make_linear, batch: int, max_len: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.blocks = nn.ModuleList(Block(make_linear, batch, max_len) for _ in range(LAYERS))
        self.norm = RMSNorm(HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        hd = HIDDEN // HEADS
        inv = 1.0 / (10000 ** (torch.arange(0, hd // 2, device=ids.device, dtype=torch.float32) / (hd // 2)))
        ang = pos * inv
        cos, sin = ang.cos().to(torch.float16), ang.sin().to(torch.float16)
        x = self.embed(ids)
        for blk in self.blocks:
            x = blk(x, pos, cos, sin)
        return self.lm_head(self.norm(x))


def fp16_linear(i: int, o: int) -> nn.Module:
    lin = nn.Linear(i, o, bias=False)
    nn.init.normal_(lin.weight, std=1 / math.sqrt(i))
    return lin


class NF4Linear(nn.Module):
    """bitsandbytes NF4 (blocksize 64) through ``bnb.matmul_4bit``: its fused gemv at one token."""

    def __init__(self, i: int, o: int) -> None:
        super().__init__()
        import bitsandbytes.functional as BF

        w = torch.randn(o, i, device="cuda", dtype=torch.float16) / math.sqrt(i)
        self.qweight, self.state = BF.quantize_4bit(w, quant_type="nf4", blocksize=64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        return bnb.matmul_4bit(x, self.qweight.t(), quant_state=self.state)


def codebook_linear_factory(m: int, b: int, g: int, device: str = "cuda"):
    from lit_cb.layers import CodebookFormat, CodebookLinear

    def make(i: int, o: int) -> nn.Module:
        fmt = CodebookFormat(in_features=i, out_features=o, in_group_size=g, num_codebooks=m, nbits_per_codebook=b)
        layer = CodebookLinear(fmt, device=device)
        layer.codes.copy_(torch.randint(0, 2**b, layer.codes.shape, device=device).to(layer.codes.dtype))
        layer.codebooks.data.normal_(0, 1 / math.sqrt(i * m))
        layer.scales.data.uniform_(0.5, 1.5)
        return layer

    return make


FUSE_GROUPS = (("q", "k", "v"), ("gate", "up"))  # this model's names for q/k/v and gate/up


def decode_tok_s(make_linear, batch: int, context: int, reps: int = 20, fuse: bool = False) -> float:
    """Tokens/s of one CUDA-graph decode step; ``fuse``: q/k/v and gate/up as one fused layer each
    (:func:`lit_cb.fused.fuse_codebook_projections`, 4 launches per block instead of 7)."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Llama7BShaped(make_linear, batch, context + 8).half().eval()
    if fuse:
        from lit_cb.fused import fuse_codebook_projections

        if fuse_codebook_projections(model, FUSE_GROUPS) != 2 * LAYERS:
            raise RuntimeError("expected q/k/v and gate/up fused in every block")
    ids = torch.randint(0, VOCAB, (batch, 1), device="cuda")
    with torch.inference_mode():
        for _ in range(3):
            model(ids, context)
        torch.cuda.synchronize()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            model(ids, context)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(ids, context)
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            graph.replay()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
    del graph, model
    torch.cuda.empty_cache()
    return batch / statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", default="1,16")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--fuse", action="store_true", help="also time each format with q/k/v and gate/up fused")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    # bench/kernels.py's helper, loaded by path: a top-level "kernels" name would shadow the package dir
    spec = importlib.util.spec_from_file_location("bench_kernels", REPO / "bench" / "kernels.py")
    bench_kernels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_kernels)
    bench_kernels.ensure_kernels_package()
    results = []
    for batch in map(int, args.batches.split(",")):
        row = {"batch": batch, "context": args.context}
        row["fp16_tok_s"] = round(decode_tok_s(fp16_linear, batch, args.context), 1)
        print(row, flush=True)
        try:
            row["bnb_nf4_tok_s"] = round(decode_tok_s(NF4Linear, batch, args.context), 1)
        except Exception as e:  # noqa: BLE001
            print("nf4 failed:", repr(e)[:300])
        row["ours_tok_s"] = {}
        for fname in args.formats.split(","):
            row["ours_tok_s"][fname] = round(
                decode_tok_s(codebook_linear_factory(*FORMATS[fname]), batch, args.context), 1
            )
            print(row, flush=True)
            if args.fuse:
                row["ours_tok_s"][fname + "+fused"] = round(
                    decode_tok_s(codebook_linear_factory(*FORMATS[fname]), batch, args.context, fuse=True), 1
                )
                print(row, flush=True)
        results.append(row)
    props = torch.cuda.get_device_properties(0)
    out = {
        "device": f"{props.name}, {props.multi_processor_count} SMs",
        "versions": {"torch": torch.__version__},
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join(sys.argv),
        "model": "LLaMA-7B-shaped (32 blocks, 4096/11008, 32 heads, vocab 32000), random weights; the 7 block "
        "projections swapped, embedding and lm_head fp16; one CUDA-graph decode step at this context",
        "results": results,
    }
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
