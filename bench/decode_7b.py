"""End-to-end decode speed of a LLaMA-7B-shaped decoder (random weights) with every linear of every block
compressed, beside fp16, bitsandbytes NF4 and AQLM's CUDA 2x8 kernel in the same run, and the step with
free projections (the floor).

    python bench/decode_7b.py --batches 1,16 --fuse --out $OUT/decode_7b_h100.json   # about 1 minute, H100
    python bench/decode_7b.py --smoke --fuse --out /tmp/d.json                       # CPU, a 2-block toy

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
import shlex
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

HIDDEN, MLP, LAYERS, HEADS, VOCAB = 4096, 11008, 32, 32, 32000
FORMATS = {"2x8_g8": (2, 8, 8), "1x8_g4": (1, 8, 4)}  # (M, B, g); 1x8 g4 is the LLM-Codebook default
TRELLIS = "trellis"  # computed codes (lit_cb/trellis.py): L12 k2 walks in 32x8 tiles, 2.06 bits


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


class AQLMLinear(nn.Module):
    """AQLM 2x8 (g8) through AQLM's own CUDA kernel, ``aqlm::code2x8_matmat`` (JIT-built by the aqlm package):
    the kernel lit_cb's 2x8_g8 rows are compared against."""

    def __init__(self, i: int, o: int) -> None:
        super().__init__()
        self.out_features = o
        self.codes = torch.randint(-128, 128, (o, i // 8, 2), device="cuda", dtype=torch.int8)
        self.codebooks = torch.randn(2, 256, 1, 8, device="cuda", dtype=torch.float16) / math.sqrt(i * 2)
        self.scales = torch.rand(o, 1, 1, 1, device="cuda", dtype=torch.float16) + 0.5
        self.zero_bias = torch.zeros(o, device="cuda", dtype=torch.float16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aqlm.code2x8_matmat(
            x.reshape(-1, x.shape[-1]), self.codes, self.codebooks, self.scales, self.zero_bias
        )
        return y.reshape(*x.shape[:-1], self.out_features)


class ZeroLinear(nn.Module):
    """A projection that costs one memset: the decode step's time without its linear layers (the floor that
    no projection kernel can beat)."""

    def __init__(self, i: int, o: int) -> None:
        super().__init__()
        self.out_features = o

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


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


def trellis_linear_factory(device: str = "cuda"):
    """TrellisLinear layers with random symbol streams (any stream is a walk) and row scales: its decode path,
    the input rotation (signs, Hadamard groups, mix) then the decode kernel (:mod:`lit_cb.kernels.trellis`)."""
    from lit_cb.trellis import TrellisFormat, TrellisLinear

    def make(i: int, o: int) -> nn.Module:
        fmt = TrellisFormat(i, o)
        layer = TrellisLinear(fmt, device=device)
        layer.codes.copy_(torch.randint(0, 2**fmt.bits_per_step, layer.codes.shape, device=device).to(torch.uint8))
        layer.scales.data.uniform_(0.5 / math.sqrt(i), 1.5 / math.sqrt(i))
        return layer

    return make


FUSE_GROUPS = (("q", "k", "v"), ("gate", "up"))  # this model's names for q/k/v and gate/up


def decode_tok_s(
    make_linear, batch: int, context: int, reps: int = 20, fuse: bool = False, smoke: bool = False
) -> float:
    """Tokens/s of one CUDA-graph decode step; ``fuse``: q/k/v and gate/up as one fused layer each
    (:func:`lit_cb.fused.fuse_projections`, 4 launches per block instead of 7). ``smoke``: the same
    model at toy sizes on the CPU, eager, one step (checks the code path, times nothing meaningful)."""
    from lit_cb.trellis import shared_rotations  # q/k/v and gate/up of trellis layers rotate their input once

    torch.manual_seed(0)
    device = "cpu" if smoke else "cuda"
    with torch.device(device):
        model = Llama7BShaped(make_linear, batch, context + 8)
    model = (model.float() if smoke else model.half()).eval()
    if fuse:
        from lit_cb.fused import fuse_projections

        if fuse_projections(model, FUSE_GROUPS) != 2 * LAYERS:
            raise RuntimeError("expected q/k/v and gate/up fused in every block")
    ids = torch.randint(0, VOCAB, (batch, 1), device=device)
    if smoke:
        with torch.inference_mode(), shared_rotations():
            t0 = time.perf_counter()
            model(ids, context)
        return batch / (time.perf_counter() - t0)
    with torch.inference_mode(), shared_rotations():
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


def _variants(formats: list[str], fuse: bool, baselines: bool, device: str) -> list[tuple[str, object, bool]]:
    """(name, linear factory, fuse?) in timing order: fp16 first (the x_fp16 reference)."""
    runs = [("fp16", fp16_linear, False), ("floor_no_projections", ZeroLinear, False)]
    if baselines:
        runs += [("bnb_nf4", NF4Linear, False), ("aqlm_cuda_2x8_g8", AQLMLinear, False)]
    for fname in formats:
        if fname == TRELLIS:
            make = lambda: trellis_linear_factory(device)  # noqa: E731
        else:
            make = lambda: codebook_linear_factory(*FORMATS[fname], device=device)  # noqa: E731, B023
        runs.append((fname, make(), False))
        if fuse:
            runs.append((fname + "+fused", make(), True))
    return runs


def main() -> None:
    global HIDDEN, MLP, LAYERS, HEADS, VOCAB
    p = argparse.ArgumentParser()
    p.add_argument("--batches", default="1,16")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--fuse", action="store_true", help="also time each format with q/k/v and gate/up fused")
    p.add_argument("--no-baselines", action="store_true", help="skip bitsandbytes NF4 and AQLM's CUDA kernel")
    p.add_argument("--smoke", action="store_true", help="a 2-block toy of the same code path on the CPU")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    t_start = time.time()
    formats = args.formats.split(",")
    if [f for f in formats if f not in [*FORMATS, TRELLIS]]:
        sys.exit(f"unknown --formats {args.formats!r}; expected some of {[*FORMATS, TRELLIS]}")
    if args.smoke:
        HIDDEN, MLP, LAYERS, HEADS, VOCAB = 64, 128, 2, 4, 100
        args.no_baselines = True
    elif not torch.cuda.is_available():
        sys.exit("no GPU: use --smoke on a CPU")
    # bench/kernel_bench.py, loaded by path (bench/ is not a package)
    spec = importlib.util.spec_from_file_location("bench_kernels", REPO / "bench" / "kernel_bench.py")
    bench_kernels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_kernels)
    bench_kernels.ensure_kernels_package()
    import triton

    versions = {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__}
    skipped = {}
    baselines = not args.no_baselines
    if baselines:
        try:
            import bitsandbytes

            versions["bitsandbytes"] = bitsandbytes.__version__
        except Exception as e:  # noqa: BLE001
            skipped["bnb_nf4"] = repr(e)[:300]
        try:
            t0 = time.time()
            bench_kernels.load_aqlm()  # JIT build (cached on the machine after bench/kernel_bench.py)
            import aqlm

            versions["aqlm"] = getattr(aqlm, "__version__", "unknown")
            print(f"aqlm kernels ready in {time.time() - t0:.0f} s", flush=True)
        except Exception as e:  # noqa: BLE001
            skipped["aqlm_cuda_2x8_g8"] = repr(e)[:300]
    device = "cpu" if args.smoke else "cuda"
    results = []
    for batch in map(int, args.batches.split(",")):
        fp16 = None
        for name, make, fuse in _variants(formats, args.fuse, baselines, device):
            if name in skipped:
                continue
            row = {"batch": batch, "context": args.context, "variant": name}
            try:
                tok_s = decode_tok_s(make, batch, args.context, fuse=fuse, smoke=args.smoke)
                row["tok_s"] = round(tok_s, 1)
                if name == "fp16":
                    fp16 = tok_s
                elif fp16 and not name.startswith("floor"):
                    row["x_fp16"] = round(tok_s / fp16, 3)
            except Exception as e:  # noqa: BLE001
                row["error"] = repr(e)[:400]
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.smoke:
        device_name = "cpu (smoke: 2-block toy, eager, PyTorch reference path)"
    else:
        props = torch.cuda.get_device_properties(0)
        device_name = f"{props.name}, {props.multi_processor_count} SMs"
    out = {
        "device": device_name,
        "versions": versions,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "model": f"LLaMA-7B-shaped ({LAYERS} blocks, {HIDDEN}/{MLP}, {HEADS} heads, vocab {VOCAB}), random "
        "weights; the 7 block projections swapped, embedding and lm_head fp16; one CUDA-graph decode step at "
        "this context. floor_no_projections: every projection a memset (what bounds the step without them); "
        "+fused: q/k/v and gate/up one launch each; lit_cb rows run the dispatcher's algo and tiles",
        "skipped": skipped,
        "results": results,
        "total_seconds": round(time.time() - t_start, 1),
    }
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
