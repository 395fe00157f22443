"""What the decode kernels load, read from their PTX: cross-compiled for an H100 (sm_90) on any machine.

    python bench/ptx_loads.py --out bench/results/ptx_loads_sm90.json     # CPU, ~1 minute, no GPU needed
    python bench/ptx_loads.py --formats 1x8_g4 --shapes 11008x4096 --out /tmp/p.json   # one kernel

Issue 10 is bound by the gathers of codewords (bench/README.md, "What bounds it, measured"). Whether a
kernel change alters those loads can be seen without a GPU: Triton compiles for a named target on a
CPU. This script calls the real launcher (``codebook_gemv`` for 1 token, ``codebook_mm`` for more,
with the tile the dispatcher picks for the shape) with a recorder in place of the kernel, so the
arguments, constexprs and warps are exactly the launch's; gives the compiler the runtime's
specialisation (every pointer 16-byte aligned, every integer argument that is a multiple of 16
marked so: what Triton's launcher does for these shapes); compiles to PTX for ``cuda:90``; and counts
the load instructions by the source line they come from and by kind (cache hints dropped). One
codeword is one ``ld.global.v2.b32`` (1x8 g4: 8 bytes) or ``ld.global.v4.b32`` (2x8 g8: 16 bytes).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import math
import os
import re
import shlex
import sys
from pathlib import Path

import torch

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (28672, 8192))  # (out, in)
FORMATS = {"1x8_g4": (1, 8, 4), "2x8_g8": (2, 8, 8)}  # (M, B, g)
TARGET = ("cuda", 90, 32)
_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.uint8: "u8"}
_TYPES.update({torch.int16: "i16", torch.int32: "i32", torch.int64: "i64"})


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.calls: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def compile_recorded(kernel, args: tuple, kwargs: dict, target=TARGET) -> str:
    """PTX of ``kernel`` for the recorded launch ``kernel[grid](*args, **kwargs)``, specialised as the
    runtime specialises it."""
    return compile_launch(kernel, args, kwargs, target).asm["ptx"]


def compile_launch(kernel, args: tuple, kwargs: dict, target=TARGET):
    """The compiled kernel (``.asm``, ``.metadata``) of :func:`compile_recorded`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    declared = {p.name for p in kernel.params if p.is_constexpr}
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    values = [*args, *[kwargs[n] for n in names[len(args) :]]]
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, value) in enumerate(zip(names, values, strict=True)):
        if name in declared:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch's allocations are 16-byte aligned
        elif isinstance(value, int):
            if value == 1:  # the runtime specialises 1 as a constant
                signature[name], constexprs[name] = "constexpr", 1
                continue
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            raise TypeError(f"argument {name}={value!r}: not a tensor, int or constexpr")
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget(*target), options=options)


def load_counts(ptx: str, span: tuple[int, int] | None = None) -> dict[str, dict[str, int]]:
    """Load instructions of ``ptx`` by the source line they come from (the last ``.loc`` before them, as
    ``file.py:line``) and kind, cache-hint qualifiers dropped (``ld.global.v2.b32`` ...); with ``span``
    (first, last PTX line index) only the loads on those lines."""
    files = dict(re.findall(r'^\s*\.file\s+(\d+)\s+"([^"]+)"', ptx, re.M))
    where = "?"
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for i, line in enumerate(ptx.splitlines()):
        loc = re.match(r"\s*\.loc\s+(\d+)\s+(\d+)", line)
        if loc:
            where = f"{Path(files.get(loc.group(1), '?')).name}:{loc.group(2)}"
            continue
        if span is not None and not span[0] <= i <= span[1]:
            continue
        for kind in re.findall(r"\b(ld\.(?:global|shared|local)[\w.:]*)", line):
            counts[where][re.sub(r"\.L[12]::[\w]+|\.nc", "", kind)] += 1
    return {k: dict(v) for k, v in sorted(counts.items())}


def gemv_ptx(num_out: int, in_features: int, fmt: str) -> tuple[str, dict]:
    """PTX of the batch-1 kernel the dispatcher runs for this shape and format, and its tile."""
    from lit_cb.kernels import codebook as K
    from lit_cb.kernels import ops

    m, b, g = FORMATS[fmt]
    codes = torch.zeros(num_out, in_features // g, m, dtype=torch.uint8)
    codebooks = torch.zeros(m, 2**b, 1, g, dtype=torch.float16)
    scales = torch.ones(num_out, 1, 1, 1, dtype=torch.float16)
    x = torch.zeros(1, in_features, dtype=torch.float16)
    cfg = ops._gemv_config(num_out, in_features, g)
    recorder, real = _Recorder(K._cb_gemv_kernel), K._cb_gemv_kernel
    K._cb_gemv_kernel = recorder
    try:
        K.codebook_gemv(x, codes, codebooks, scales, None, b, cfg)
    finally:
        K._cb_gemv_kernel = real
    ((args, kwargs),) = recorder.calls
    tile = {"block_n": cfg.block_n, "block_g": cfg.block_g, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    return compile_recorded(real, args, dict(kwargs)), tile


def mm_ptx(num_out: int, in_features: int, fmt: str, tokens: int = 16, num_sms: int = 132) -> tuple[str, dict]:
    """PTX of the tensor-core kernel the dispatcher runs for ``tokens`` tokens (an H100's 132 SMs for
    its split-K choice), and its tile."""
    from lit_cb.kernels import codebook as K
    from lit_cb.kernels import ops

    m, b, g = FORMATS[fmt]
    codes = torch.zeros(num_out, in_features // g, m, dtype=torch.uint8)
    codebooks = torch.zeros(m, 2**b, 1, g, dtype=torch.float16)
    scales = torch.ones(num_out, 1, 1, 1, dtype=torch.float16)
    x = torch.zeros(tokens, in_features, dtype=torch.float16)
    cfg = ops._mm_config(tokens, num_out, in_features, g, in_features // g, num_sms)
    recorder, real = _Recorder(K._cb_mm_kernel), K._cb_mm_kernel
    K._cb_mm_kernel = recorder
    try:
        K.codebook_mm(x, codes, codebooks, scales, None, b, cfg)
    except Exception:
        if not recorder.calls:  # the split-K epilogue runs a second (real) kernel after the recorded one
            raise
    finally:
        K._cb_mm_kernel = real
    args, kwargs = recorder.calls[0]
    tile = {k: getattr(cfg, k) for k in ("block_m", "block_n", "block_g", "num_warps", "num_stages", "split_k")}
    return compile_recorded(real, args, dict(kwargs)), tile


def smem_gemv_compiled(num_out: int, in_features: int, fmt: str, config=None, dtype=torch.float16):
    """The shared-table gemv (lit_cb/kernels/smem_table.py) as the launcher would run it for this shape: its
    shared-memory plan from the probe and real compiles, and the real compiled kernel."""
    from lit_cb.kernels import smem_table as S

    m, b, g = FORMATS[fmt]
    cfg = config or S.smem_config(g)
    codes = torch.zeros(num_out, in_features // g, m, dtype=torch.uint8)
    codebooks = torch.zeros(m, 2**b, 1, g, dtype=dtype)
    scales = torch.ones(num_out, 1, 1, 1, dtype=torch.float16)
    x = torch.zeros(1, in_features, dtype=dtype)
    out = torch.empty(1, num_out, dtype=dtype)
    args, kwargs = S.kernel_args(x, codes, codebooks, scales, None, b, out, cfg)
    last = {}

    def compile_shared(overrides: dict) -> int:
        last["kernel"] = compile_launch(S._cb_gemv_smem_kernel, args, {**kwargs, **overrides})
        return last["kernel"].metadata.shared

    plan = S.plan_shared(compile_shared, S.table_bytes(m, b, g, kwargs["NCOPIES"]))
    tile = {"block_n": cfg.block_n, "block_g": cfg.block_g, "num_warps": cfg.num_warps, "ncopies": kwargs["NCOPIES"]}
    return last["kernel"], plan, tile


def smem_mm_compiled(num_out: int, in_features: int, fmt: str, tokens: int = 16, config=None, dtype=torch.float16):
    """The shared-table mm (lit_cb/kernels/smem_mm.py) as its launcher would run it for this shape and token
    count: (real compiled kernel, plan, tile, probe compiled kernel)."""
    from lit_cb.kernels import smem_mm as SM
    from lit_cb.kernels import smem_table as S

    m, b, g = FORMATS[fmt]
    cfg = config or SM.mm_config(tokens, g)
    codes = torch.zeros(num_out, in_features // g, m, dtype=torch.uint8)
    codebooks = torch.zeros(m, 2**b, 1, g, dtype=dtype)
    scales = torch.ones(num_out, 1, 1, 1, dtype=torch.float16)
    x = torch.zeros(tokens, in_features, dtype=dtype)
    out = torch.empty(tokens, num_out, dtype=dtype)
    args, kwargs = SM.kernel_args(x, codes, codebooks, scales, None, b, out, cfg)
    compiled = []

    def compile_shared(overrides: dict) -> int:
        compiled.append(compile_launch(SM._cb_mm_smem_kernel, args, {**kwargs, **overrides}))
        return compiled[-1].metadata.shared

    plan = S.plan_shared(compile_shared, S.table_bytes(m, b, g, kwargs["NCOPIES"]))
    tile = {k: getattr(cfg, k) for k in ("block_m", "block_n", "block_g", "num_warps", "ctas_per_sm")}
    tile["ncopies"] = kwargs["NCOPIES"]
    return compiled[-1], plan, tile, compiled[0]


def inline_asm_tags(ptx: str) -> list[str | None]:
    """Per PTX line: ``None`` outside inline asm, else the block's ``// lcb:<tag>`` (``"asm"`` if untagged)."""
    tag, tags = None, []
    for line in ptx.splitlines():
        if "// begin inline asm" in line:
            tag = "asm"
        elif tag is not None and (m := re.search(r"// lcb:([\w-]+)", line)):
            tag = m.group(1)
        tags.append(tag)
        if "// end inline asm" in line:
            tag = None
    return tags


def loads_by_tag(ptx: str, span: tuple[int, int]) -> dict[str, dict[str, int]]:
    """Load kinds on PTX lines ``span`` by who emits them: an lit_cb asm tag, other asm, or ``triton``."""
    tags = inline_asm_tags(ptx)
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for i, line in enumerate(ptx.splitlines()[span[0] : span[1] + 1], start=span[0]):
        for kind in re.findall(r"\b(ld\.(?:global|shared|local)[\w.:]*)", line):
            counts[tags[i] or "triton"][re.sub(r"\.L[12]::[\w]+|\.nc", "", kind)] += 1
    return {k: dict(v) for k, v in sorted(counts.items())}


_SHARED_OPS = re.compile(r"\b(ld\.shared|st\.shared|ldmatrix|stmatrix|cp\.async|atom\.shared|red\.shared)")


def innermost_loop(lines: list[str]) -> tuple[int, int]:
    """(header line, back-branch line) of the deepest loop, from LLVM's ``Loop Header: Depth=d`` comments."""
    best, label_at = None, None
    for i, line in enumerate(lines):
        if m := re.match(r"^(\$L__BB\d+_\d+):", line):
            label_at = (i, m.group(1))
        depth = re.search(r"Loop Header: Depth=(\d+)", line)  # on the label's line or the next
        if depth and label_at and (best is None or int(depth.group(1)) > best[0]):
            best = (int(depth.group(1)), *label_at)
    if best is None:
        raise ValueError("no loop in this PTX")
    _, start, label = best
    back = [
        i
        for i, line in enumerate(lines)
        if i > start and re.search(r"\bbra(?:\.uni)?\s+" + re.escape(label) + ";", line)
    ]
    return start, max(back)


def smem_report(ptx: str) -> dict:
    """What the shared-table kernel's PTX does, for tests/test_smem_table.py: the loads of its innermost loop
    by emitter (``gather``, ``x``: its asm blocks; ``triton``: the codes); its asm barriers (``acquire``,
    ``release``) and whether staging stores / gathers sit before / after the release barrier; and every
    shared-memory instruction Triton emits itself after that barrier (none may, with the table at offset 0)."""
    lines = ptx.splitlines()
    tags = inline_asm_tags(ptx)
    start, stop = innermost_loop(lines)
    at = collections.defaultdict(list)
    for i, line in enumerate(lines):
        if tags[i] and re.search(r"\b(bar\.sync|st\.shared|ld\.shared)\b", line):
            at[f"{tags[i]}:{re.search(r'bar.sync|st.shared|ld.shared', line).group(0)}"].append(i)
    release = at["release:bar.sync"][-1] if at["release:bar.sync"] else len(lines)
    return {
        "inner_loop_loads": loads_by_tag(ptx, (start, stop)),
        "inner_loop_lines": [start, stop],
        "asm_barriers": {t: len(at[f"{t}:bar.sync"]) for t in ("acquire", "release")},
        "barriers_total": sum(bool(re.search(r"\bbar\.sync\b", line)) for line in lines),
        "staging_stores": len(at["stage-store:st.shared"]),
        "staging_after_acquire": min(at["stage-store:st.shared"], default=-1) > max(at["acquire:bar.sync"], default=0),
        "staging_before_release": max(at["stage-store:st.shared"], default=len(lines)) < release,
        "gathers_after_release": min(at["gather:ld.shared"], default=-1) > release,
        "gathers_in_inner_loop": sum(start <= i <= stop for i in at["gather:ld.shared"]),
        "triton_shared_after_release": [
            lines[i].strip() for i in range(release, len(lines)) if not tags[i] and _SHARED_OPS.search(lines[i])
        ],
    }


_DTYPE_BYTES = {"f16": 2, "bf16": 2, "f32": 4, "i32": 4, "i8": 1, "i16": 2}


def shared_allocations(ttgir: str, capability: int = TARGET[1]) -> list[dict]:
    """Triton's own shared-memory buffers in a compiled kernel's TTGIR, as its allocator places them: the
    ``allocation.offset`` (and ``allocation.size`` where this Triton records it, else the ``memdesc`` size of a
    ``local_alloc``) of every op, by running the backend's shared-memory allocation pass on the TTGIR (the
    first passes of its ``make_llir``). ``after_acquire``: the op comes after the ``lcb:acquire`` asm, i.e. is
    live while the table may be; the reservation's gather (and its reduce) come before."""
    import tempfile

    from triton._C.libtriton import ir, nvidia, passes
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    ctx = ir.context()
    ir.load_dialects(ctx)
    make_backend(GPUTarget(*TARGET)).load_dialects(ctx)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "kernel.ttgir"
        path.write_text(ttgir)
        mod = ir.parse_mlir_module(str(path), ctx)
    mod.context = ctx
    pm = ir.pass_manager(ctx)
    passes.ttgpuir.add_combine_tensor_select_and_if(pm)
    passes.convert.add_scf_to_cf(pm)
    passes.gluon.add_inliner(pm)
    nvidia.passes.ttgpuir.add_allocate_shared_memory_nv(pm, capability, 80)
    pm.run(mod, "lit_cb_shared_allocations")
    rows, acquired = [], False
    for line in str(mod).splitlines():
        acquired = acquired or "lcb:acquire" in line
        offset = re.search(r"allocation\.offset = (\d+)", line)
        if not offset:
            continue
        op = re.search(r"\b(tt\.\w+|ttg\.\w+|ttng\.\w+|\"tt\.\w+\")", line)
        size = re.search(r"allocation\.size = (\d+)", line)
        if size is None and (desc := re.search(r"-> !ttg\.memdesc<([\dx]+)x(\w+),", line)):
            dims = [int(v) for v in desc.group(1).split("x")]
            size = [None, math.prod(dims) * _DTYPE_BYTES.get(desc.group(2), 4)]
        rows.append(
            {
                "op": op.group(1).strip('"') if op else "reduce-or-region-op",
                "offset": int(offset.group(1)),
                "size": int(size[1]) if size else None,
                "after_acquire": acquired,
            }
        )
    return rows


def smem_mm_report(compiled, probe, plan) -> dict:
    """:func:`smem_report` plus where Triton's own buffers of the real compile lie (:func:`shared_allocations`):
    those after the acquire asm must be the probe's, at the probe's offsets, and end at or below the table
    (sizes that this Triton does not record are bounded by the probe's ``metadata.shared`` instead)."""
    from lit_cb.kernels import smem_table as S

    real = [a for a in shared_allocations(compiled.asm["ttgir"]) if a["after_acquire"]]
    probed = [a for a in shared_allocations(probe.asm["ttgir"]) if a["after_acquire"]]
    ends = [a["offset"] + a["size"] for a in real if a["size"] is not None]
    return {
        **smem_report(compiled.asm["ptx"]),
        "triton_buffers_live_with_table": real,
        "buffers_as_in_probe": [(a["op"], a["offset"]) for a in real] == [(a["op"], a["offset"]) for a in probed],
        "buffers_below_table": all(a["offset"] < plan.table_off for a in real)
        and max(ends, default=0) <= plan.table_off,
        "ctas_per_sm": S.resident_ctas(plan, 64),  # by shared memory alone (the launcher caps it further)
    }


def per_thread_loads(tile: dict, fmt: str) -> dict:
    """Codeword gathers per thread per K step the tile implies: ``block_n * block_g * M`` codewords over the
    CTA's threads (what the PTX's inner loop should hold, one shared vector load each)."""
    m, _, g = FORMATS[fmt]
    threads = 32 * tile["num_warps"]
    return {
        "codeword_gathers": tile["block_n"] * tile["block_g"] * m // threads,
        "inputs_per_k_step": tile["block_g"] * g,
    }


def table_compiled(num_out: int, in_features: int, fmt: str, tokens: int = 1):
    """The lookup-table matvec (lit_cb/kernels/table_gemv.py) for ``tokens`` tokens with its default config, compiled
    for sm_90 from the launch its launcher makes (the table build and the split-K reduction are not compiled), and
    its tile."""
    from lit_cb.kernels import table_gemv as T

    m, b, g = FORMATS[fmt]
    codes = T.interleave_codes(torch.zeros(num_out, in_features // g, m, dtype=torch.uint8))
    codebooks = torch.zeros(m, 2**b, 1, g, dtype=torch.float16)
    table = torch.zeros(1, tokens, (in_features // g) * m, 2**b, dtype=torch.float16)
    cfg = T.TableGemvConfig()
    rec = _Recorder(T._table_gemv_kernel)
    saved = T._table_gemv_kernel, T._num_sms, T._reduce_parts
    T._table_gemv_kernel, T._num_sms, T._reduce_parts = rec, lambda device: 132, lambda *a: None  # H100: 132 SMs
    try:
        x = torch.zeros(tokens, in_features, dtype=torch.float16)
        T.table_gemv(x, codes, codebooks, torch.ones(num_out, 1, 1, 1, dtype=torch.float16), None, b, cfg, None, table)
    finally:
        T._table_gemv_kernel, T._num_sms, T._reduce_parts = saved
    ((args, kwargs),) = rec.calls
    tile = {"block_n": cfg.block_n, "block_t": kwargs["BLOCK_T"], "chunk": codes.shape[2], "num_warps": cfg.num_warps}
    return compile_launch(saved[0], args, dict(kwargs)), tile


def resource_usage(compiled) -> dict[str, int]:
    """Registers per thread and static shared memory of a compiled kernel, from the cubin (``cuobjdump -res-usage``
    of the triton wheel's CUDA tools): what bounds its occupancy."""
    import subprocess
    import tempfile

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return {
        "registers": int(re.search(r"REG:(\d+)", text).group(1)),
        "shared": int(re.search(r"SHARED:(\d+)", text).group(1)),
    }


def blocked_layouts(ttgir: str) -> list[str]:
    """The ``#blocked`` layouts of the loads in a kernel's TTGIR (which dims the lanes of a warp run along)."""
    names = dict(re.findall(r"^(#blocked\d*) = #ttg\.blocked<(\{[^}]*\})>", ttgir, re.M))
    used = re.findall(r"tt\.load .*?tensor<[^,]*, (#blocked\d*)>", ttgir)
    return [names[u] for u in used if u in names]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated, of {list(FORMATS)}")
    p.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in SHAPES), help="OUTxIN,...")
    p.add_argument("--tokens", default="1,16", help="1: the gemv kernel; 2-64: the tensor-core (mm) kernel")
    p.add_argument(
        "--smem",
        action="store_true",
        help="the shared-table prototypes: gemv (1 token, smem_table.py), mm (smem_mm.py)",
    )
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"], help="with --smem: codebooks and x")
    p.add_argument("--table", action="store_true", help="the lookup-table matvec (table_gemv.py), 1-4 tokens")
    args = p.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("TRITON_INTERPRET=1 makes the kernels Python functions: unset it to compile them")
    import triton

    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rows = []
    for fmt in args.formats.split(","):
        for num_out, in_features in shapes:
            for tokens in (int(t) for t in args.tokens.split(",")):
                extra = {}
                if args.table:
                    compiled, tile = table_compiled(num_out, in_features, fmt, tokens)
                    kernel, ptx = "table_gemv", compiled.asm["ptx"]
                    extra = {"load_layouts": blocked_layouts(compiled.asm["ttgir"]), **resource_usage(compiled)}
                elif tokens == 1 and args.smem:
                    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
                    compiled, plan, tile = smem_gemv_compiled(num_out, in_features, fmt, dtype=dtype)
                    kernel, ptx = "gemv_smem", compiled.asm["ptx"]
                    extra = {"shared_plan": dataclasses.asdict(plan), "smem": smem_report(ptx)}
                elif args.smem:
                    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
                    compiled, plan, tile, probe = smem_mm_compiled(num_out, in_features, fmt, tokens, dtype=dtype)
                    kernel, ptx = "mm_smem", compiled.asm["ptx"]
                    extra = {
                        "shared_plan": dataclasses.asdict(plan),
                        "smem": smem_mm_report(compiled, probe, plan),
                        "per_thread_per_k_step": per_thread_loads(tile, fmt),
                    }
                elif tokens == 1:
                    kernel, (ptx, tile) = "gemv", gemv_ptx(num_out, in_features, fmt)
                else:
                    kernel, (ptx, tile) = "mm", mm_ptx(num_out, in_features, fmt, tokens)
                shape = f"{num_out}x{in_features}"
                row = {"kernel": kernel, "tokens": tokens, "format": fmt, "shape": shape, "tile": tile}
                rows.append({**row, "loads": load_counts(ptx), **extra})
                print(rows[-1], flush=True)
    doc = {
        "what": "load instructions in the PTX of the dispatched gemv (1 token) and mm (16 tokens) kernels, by "
        "source line, cross-compiled for sm_90",
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": {"triton": triton.__version__, "torch": torch.__version__},
        "target": ":".join(map(str, TARGET)),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
