"""Prototype batch-1 codebook GEMV with the codebooks staged in SHARED memory, one copy per bank group
(issue 10). Opt-in only: see :func:`enabled`; the dispatcher runs :func:`lit_cb.kernels.codebook.codebook_gemv`
otherwise.

Why: the plain gemv gathers codewords from L1, and each warp-wide gather touches about 24 different 32-byte
sectors (bench/README.md, "What bounds it"). Here every CTA first copies the codebooks into shared memory
with ``NCOPIES`` copies of each codeword side by side,

    byte offset of (entry e, copy c) = TABLE_OFF + (e * NCOPIES + c) * CWB        (CWB = 2 * G bytes)

and lane ``l`` reads copy ``l % NCOPIES``. A ``ld.shared.v4.b32`` (16-byte codeword, 2x8 g8) is served one
quarter-warp (8 lanes) at a time, a ``ld.shared.v2.b32`` (8 bytes, 1x8 g4) one half-warp (16 lanes) at a
time; with ``NCOPIES`` = 8 resp. 16 the lanes of one phase land on distinct 16-byte (8-byte) bank groups
whatever their codes, so a gather costs the minimum 4 (2) wavefronts instead of ~24 sectors.
:func:`banked_lookup` is a pure-torch model of this layout (tested on the CPU).

Plain Triton has no shared-memory gather, so the table is written and read with inline PTX
(``st.shared`` / ``ld.shared``), addressed from the symbol Triton's PTX declares for its dynamic shared
memory, ``.extern .shared .align 16 .b8 global_smem[];`` (the name in Triton 3.6 and 3.9 alike).

HAZARD, shared memory that Triton does not know about. Triton sizes the launch's dynamic shared memory from
its OWN allocations and reuses that memory, from offset 0, for layout conversions and reductions; the
inline-asm table is invisible to its allocator and to its barrier analysis. Three rules keep them apart:

1. Size: the kernel starts with :func:`_reserve_shared`, a ``tl.gather`` whose source Triton must put in
   shared memory, ``RESERVE_WORDS * 4`` bytes; that makes ``metadata.shared`` (the launch size) cover the
   table. The launcher checks ``compiled.metadata.shared`` before the first launch, and the kernel traps if
   ``%dynamic_smem_size`` is still too small, so a Triton version that sizes it differently fails loudly
   instead of reading out of bounds.
2. Place: Triton's own scratch used while the table is live (the per-tile row reduction of the persistent
   loop) lies in ``[0, s)``, where ``s`` is ``metadata.shared`` of the same kernel compiled without the
   reservation (the "probe", :func:`plan_shared`). The table goes to ``[TABLE_OFF, TABLE_OFF + T)`` with
   ``TABLE_OFF >= s``: offset 0 when ``s == 0``, else the top of a power-of-two reservation.
3. Order: the reservation's scratch is written and read by Triton before the table is written, so the
   staging asm starts with ``bar.sync 0`` (all warps done with the reservation), and ends with another
   ``bar.sync 0`` (table complete) whose result, the table's base address, every gather takes as an operand:
   the data dependency keeps every gather after that barrier. No Triton shared-memory use may sit between
   staging and the last gather except in ``[0, s)``; tests/test_smem_table.py checks the PTX.

The multi-token tensor-core variant (lit_cb/kernels/smem_mm.py) stages the same table with the same functions
(:func:`_setup_table`, :func:`_gather`, :func:`table_constexprs`, :func:`plan_for`); there Triton's own shared
memory live with the table is ``tl.dot``'s operand staging, which the probe measures like any other.

Only fp16/bf16 codebooks with 4- or 8-wide codewords (1x8 g4, 2x8 g8, 1x16 is too big for a table), fp16/bf16
activations, one part (no fused layers). Cannot run under TRITON_INTERPRET (the interpreter has no PTX).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .codebook import _load_codes

ENV_FLAG = "LIT_CB_SMEM_TABLES"
SMEM_PER_SM = 227 * 1024  # H100/H200: the most one CTA may ask for; 228 KB per SM
SMEM_PER_CTA_RESERVED = 1024  # the driver keeps 1 KB per resident CTA
MAX_TABLE_BYTES = 128 * 1024
CODEWORD_BYTES = (8, 16)  # one ld.shared.v2.b32 / ld.shared.v4.b32 per codeword


@dataclass(frozen=True)
class SmemGemvConfig:
    """``block_n`` rows x ``block_g`` groups per K step; ``ncopies`` copies per codeword (None: one per lane of
    a load phase, 8 for 16-byte and 16 for 8-byte codewords); ``ctas_per_sm`` caps the persistent grid."""

    block_n: int = 16
    block_g: int = 32
    num_warps: int = 4
    ncopies: int | None = None
    ctas_per_sm: int = 4


def smem_config(group_size: int) -> SmemGemvConfig:
    """256 inputs per K step (32 groups of 8 or 64 of 4) over 16 rows: 4 resp. 8 tile elements per thread."""
    return SmemGemvConfig(block_n=16, block_g=max(1, 256 // group_size))


def enabled() -> bool:
    """Opt-in (``LIT_CB_SMEM_TABLES=1``) and never under the interpreter, which cannot run inline PTX."""
    return os.environ.get(ENV_FLAG) == "1" and os.environ.get("TRITON_INTERPRET") != "1"


def default_ncopies(group_size: int) -> int:
    """Lanes per shared-memory load phase: 8 for 16-byte codewords (quarter-warp), 16 for 8-byte (half-warp)."""
    return 128 // (2 * group_size)


def table_bytes(num_codebooks: int, nbits: int, group_size: int, ncopies: int) -> int:
    return num_codebooks * (1 << nbits) * ncopies * 2 * group_size


def supports(
    x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, nbits: int, ncopies: int | None = None
) -> bool:
    """Whether the shared-table kernel takes this call's format and dtypes (else the caller runs the L1 gemv)."""
    if codebooks.dim() != 4 or codebooks.shape[-2] != 1:
        return False
    g = codebooks.shape[-1]
    if 2 * g not in CODEWORD_BYTES or codebooks.dtype not in (torch.float16, torch.bfloat16):
        return False
    if x.dtype not in (torch.float16, torch.bfloat16) or nbits > 8 or codes.dtype != torch.uint8:
        return False
    return table_bytes(codes.shape[2], nbits, g, ncopies or default_ncopies(g)) <= MAX_TABLE_BYTES


# ----------------------------------------------------------------------------------------- PTX text


def _unpack(words: list[str], outs: list[str], bf16: bool) -> list[str]:
    """PTX turning 32-bit words of two 16-bit floats (element 2q in the low half) into fp32 outputs."""
    lines = []
    for q, w in enumerate(words):
        lo, hi = outs[2 * q], outs[2 * q + 1]
        if bf16:  # bf16 -> fp32 is the bf16 bits in the high half
            lines += [f"shl.b32 %lcb_t, {w}, 16;", f"mov.b32 {lo}, %lcb_t;"]
            lines += [f"and.b32 %lcb_t, {w}, -65536;", f"mov.b32 {hi}, %lcb_t;"]
        else:
            lines += [
                f"mov.b32 {{%lcb_h0, %lcb_h1}}, {w};",
                f"cvt.f32.f16 {lo}, %lcb_h0;",
                f"cvt.f32.f16 {hi}, %lcb_h1;",
            ]
    return lines


def _vec(group_size: int) -> str:
    return "v4" if group_size == 8 else "v2"


def _block(lines: list[str], regs: str, tag: str) -> str:
    """A PTX scope ``{ }`` (its registers are local, so the asm may be instantiated many times) that starts
    with the comment ``// lcb:<tag>``, by which bench/ptx_loads.py tells the asm blocks apart in the PTX."""
    return "{\n// lcb:" + tag + "\n" + regs + "\n" + "\n".join(lines) + "\n}"


_TMP_REGS = ".reg .b32 %lcb_a, %lcb_t, %lcb_w<4>;\n.reg .b16 %lcb_h<2>;"


def gather_asm(group_size: int, ncopies: int, bf16: bool) -> tuple[str, str]:
    """(asm, constraints) of one codeword gather: inputs code ``$G`` (0..2**B-1) and the codebook's table base
    ``$G+1`` (a shared-window address); outputs ``$0..$G-1``, the codeword in fp32. The copy is picked from the
    lane id here, so the bank spread does not depend on how Triton lays the tile out over lanes."""
    cwb, half = 2 * group_size, group_size // 2
    words = [f"%lcb_w{q}" for q in range(half)]
    lines = [
        "mov.u32 %lcb_a, %laneid;",
        f"and.b32 %lcb_a, %lcb_a, {ncopies - 1};",
        f"mad.lo.u32 %lcb_a, ${group_size}, {ncopies}, %lcb_a;",  # entry * NCOPIES + copy
        f"mad.lo.u32 %lcb_a, %lcb_a, {cwb}, ${group_size + 1};",  # * codeword bytes + base
        f"ld.shared.{_vec(group_size)}.b32 {{{', '.join(words)}}}, [%lcb_a];",
    ]
    lines += _unpack(words, [f"${j}" for j in range(group_size)], bf16)
    return _block(lines, _TMP_REGS, "gather"), "=f," * group_size + "r,r"


def x_asm(group_size: int, bf16: bool) -> tuple[str, str]:
    """(asm, constraints): one group of x (``$G``: its global address, 8/16-byte aligned) as G fp32 values."""
    words = [f"%lcb_w{q}" for q in range(group_size // 2)]
    lines = [f"ld.global.nc.{_vec(group_size)}.b32 {{{', '.join(words)}}}, [${group_size}];"]
    lines += _unpack(words, [f"${j}" for j in range(group_size)], bf16)
    return _block(lines, _TMP_REGS, "x"), "=f," * group_size + "l"


def load_words_asm(group_size: int) -> tuple[str, str]:
    """(asm, constraints): a codeword's raw 32-bit words from global memory (``$G/2``: its address)."""
    half = group_size // 2
    outs = ", ".join(f"${q}" for q in range(half))
    return f"// lcb:stage-load\nld.global.nc.{_vec(group_size)}.b32 {{{outs}}}, [${half}];", "=r," * half + "l"


def store_words_asm(group_size: int) -> tuple[str, str]:
    """(asm, constraints): store words ``$2..`` at shared address ``$1``; ``$0`` is a dummy (0) output."""
    half = group_size // 2
    ins = ", ".join(f"${q + 2}" for q in range(half))
    return (
        f"// lcb:stage-store\nst.shared.{_vec(group_size)}.b32 [$1], {{{ins}}};\nmov.u32 $0, 0;",
        "=r,r" + ",r" * half,
    )


def acquire_asm(table_off: int, need_bytes: int) -> str:
    """Start of staging: trap if the launch's dynamic shared memory cannot hold the table (a Triton that sized
    it differently), wait until every warp is done with Triton's scratch, return the table's base address."""
    return _block(
        [
            "mov.u32 %lcb_s, %dynamic_smem_size;",
            f"setp.lt.u32 %lcb_p, %lcb_s, {need_bytes};",
            "@%lcb_p trap;",
            "bar.sync 0;",
            "mov.u32 $0, global_smem;",
            f"add.u32 $0, $0, {table_off};",
        ],
        ".reg .pred %lcb_p;\n.reg .b32 %lcb_s;",
        "acquire",
    )


PROBE_ACQUIRE_ASM = "// lcb:acquire\nbar.sync 0;\nmov.u32 $0, 0;"  # the probe compile's stand-in (see plan_shared)
STORE_OUT_ASM = tl.constexpr(
    _block(
        ["setp.ne.b32 %lcb_p, $2, 0;", "@%lcb_p st.global.b16 [$1], $3;", "mov.u32 $0, 0;"],
        ".reg .pred %lcb_p;",
        "store-out",
    )
)  # $1 address, $2 mask, $3 the 16 bits
RELEASE_ASM = tl.constexpr("// lcb:release\nbar.sync 0;\nmov.u32 $0, $1;")  # end of staging: the whole table is written


# ---------------------------------------------------------------------------------------- the kernel


@triton.jit
def _reserve_shared(seed, WORDS: tl.constexpr):
    """A gather whose ``[WORDS]`` int32 source spans every warp, so Triton stages it through ``4 * WORDS`` bytes
    of shared memory: the only plain-Triton way to make the launch ask for the table's bytes. ``seed`` is a
    runtime value so nothing folds; returns a scalar that the staging asm takes, to run after it."""
    src = tl.arange(0, WORDS) * seed
    idx = (tl.arange(0, 128) * seed) & (WORDS - 1)  # any index count: the source sets the size
    return tl.max(tl.gather(src, idx, 0), 0)


@triton.jit
def _stage_table(
    cb_ptr,
    base,
    NE: tl.constexpr,
    G: tl.constexpr,
    NCOPIES: tl.constexpr,
    LOAD_ASM: tl.constexpr,
    LOAD_CONS: tl.constexpr,
    STORE_ASM: tl.constexpr,
    STORE_CONS: tl.constexpr,
):
    """Write ``NCOPIES`` copies of every codeword (all codebooks, ``NE`` entries) to the table at ``base``:
    slot ``s = e * NCOPIES + c`` (entry e, copy c) at ``base + s * 2G``. Slot-major over the threads, so the
    lanes of a warp store consecutive codewords (no bank conflicts) and re-read each entry from L1.
    Side-effecting asm, so it stays in place and is kept."""
    slot = tl.arange(0, NE * NCOPIES)
    src = cb_ptr + (slot // NCOPIES) * G
    w = tl.inline_asm_elementwise(LOAD_ASM, LOAD_CONS, [src], dtype=(tl.int32,) * (G // 2), is_pure=True, pack=1)
    addr = base + slot * (2 * G)
    if G == 8:
        tl.inline_asm_elementwise(
            STORE_ASM, STORE_CONS, [addr, w[0], w[1], w[2], w[3]], dtype=tl.int32, is_pure=False, pack=1
        )
    else:
        tl.inline_asm_elementwise(STORE_ASM, STORE_CONS, [addr, w[0], w[1]], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _setup_table(
    cb_ptr,
    seed,
    NE: tl.constexpr,
    G: tl.constexpr,
    NCOPIES: tl.constexpr,
    RESERVE_WORDS: tl.constexpr,
    ACQUIRE_ASM: tl.constexpr,
    LOAD_ASM: tl.constexpr,
    LOAD_CONS: tl.constexpr,
    STORE_ASM: tl.constexpr,
    STORE_CONS: tl.constexpr,
):
    """Reserve, acquire, stage, release (HAZARD rules 1-3): the table's base address, which every gather must
    take as an operand so that it stays after the release barrier. ``RESERVE_WORDS == 0`` is the probe compile
    (Triton's own shared memory only, see :func:`plan_shared`). Shared by the gemv and the mm kernels."""
    if RESERVE_WORDS > 0:
        ticket = _reserve_shared(seed, RESERVE_WORDS)
    else:
        ticket = seed * 0
    base = tl.inline_asm_elementwise(ACQUIRE_ASM, "=r,r", [ticket], dtype=tl.int32, is_pure=False, pack=1)
    _stage_table(cb_ptr, base, NE, G, NCOPIES, LOAD_ASM, LOAD_CONS, STORE_ASM, STORE_CONS)
    return tl.inline_asm_elementwise(RELEASE_ASM, "=r,r", [base], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _gather(codes, base, G: tl.constexpr, GATHER_ASM: tl.constexpr, GATHER_CONS: tl.constexpr):
    """Codewords of ``codes`` (any shape) from the table part at ``base``: a tuple of G fp32 tensors."""
    return tl.inline_asm_elementwise(
        GATHER_ASM, GATHER_CONS, [codes, base], dtype=(tl.float32,) * G, is_pure=True, pack=1
    )


@triton.jit
def _store_rows(ptrs, bits, mask):
    """``tl.store`` without its layout conversion: the reduced rows sit in a slice layout (each row held by
    several lanes), and Triton would move them to a store layout through shared memory, under the table, on
    every row tile. Every holder of a row stores the same 16 bits instead (one transaction per address)."""
    tl.inline_asm_elementwise(
        STORE_OUT_ASM,
        "=r,l,r,h",
        [ptrs, mask.to(tl.int32), bits],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _cb_gemv_smem_kernel(
    x_ptr,
    codes_ptr,
    cb_ptr,
    scales_ptr,
    bias_ptr,
    out_ptr,
    N,
    K_GROUPS,
    NUM_TILES,
    stride_xt,
    stride_ot,
    stride_cn,
    NUM_CODEBOOKS: tl.constexpr,
    NBITS: tl.constexpr,
    G: tl.constexpr,
    PACKED: tl.constexpr,
    WORD_BITS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
    NCOPIES: tl.constexpr,
    TABLE_OFF: tl.constexpr,
    RESERVE_WORDS: tl.constexpr,
    ACQUIRE_ASM: tl.constexpr,
    GATHER_ASM: tl.constexpr,
    GATHER_CONS: tl.constexpr,
    X_ASM: tl.constexpr,
    X_CONS: tl.constexpr,
    LOAD_ASM: tl.constexpr,
    LOAD_CONS: tl.constexpr,
    STORE_ASM: tl.constexpr,
    STORE_CONS: tl.constexpr,
):
    """out[t, n] = scales[n] * sum_k x[t, k] W'[n, k] + bias[n]; grid (persistent programs, tokens): each
    program stages the table once and then walks row tiles ``pid, pid + P, ...``."""
    pid = tl.program_id(0)
    t = tl.program_id(1)
    CB_BYTES: tl.constexpr = (1 << NBITS) * NCOPIES * 2 * G  # one codebook's part of the table
    base = _setup_table(
        cb_ptr,
        pid + N,
        NUM_CODEBOOKS << NBITS,
        G,
        NCOPIES,
        RESERVE_WORDS,
        ACQUIRE_ASM,
        LOAD_ASM,
        LOAD_CONS,
        STORE_ASM,
        STORE_CONS,
    )

    offs_j = tl.arange(0, BLOCK_N)
    x_row = x_ptr + t.to(tl.int64) * stride_xt
    for tile in range(pid, NUM_TILES, tl.num_programs(0)):
        offs_n = tile * BLOCK_N + offs_j
        n_mask = offs_n < N
        acc = tl.zeros([BLOCK_N, BLOCK_G], dtype=tl.float32)
        for kg in range(0, K_GROUPS, BLOCK_G):
            offs_g = kg + tl.arange(0, BLOCK_G)
            g_mask = offs_g < K_GROUPS
            mask = n_mask[:, None] & g_mask[None, :]
            # x of these groups (the last group's for masked ones, zeroed below), G fp32 values per group
            xs = tl.inline_asm_elementwise(
                X_ASM,
                X_CONS,
                [x_row + tl.minimum(offs_g, K_GROUPS - 1) * G],
                dtype=(tl.float32,) * G,
                is_pure=True,
                pack=1,
            )
            for m in tl.static_range(NUM_CODEBOOKS):
                c = _load_codes(codes_ptr, offs_n, offs_g, mask, stride_cn, m, NUM_CODEBOOKS, NBITS, PACKED, WORD_BITS)
                cw = _gather(c, base + m * CB_BYTES, G, GATHER_ASM, GATHER_CONS)
                for j in tl.static_range(G):
                    acc += cw[j] * tl.where(g_mask, xs[j], 0.0)[None, :]
        out = tl.sum(acc, axis=1) * tl.load(scales_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        bits = out.to(out_ptr.dtype.element_ty).to(tl.int16, bitcast=True)
        _store_rows(out_ptr + t.to(tl.int64) * stride_ot + offs_n, bits, n_mask)


# ----------------------------------------------------------------------------------------- launcher


@dataclass(frozen=True)
class SharedPlan:
    """Where the table sits in the launch's shared memory (see the module's HAZARD notes)."""

    table_bytes: int
    probe_shared: int  # Triton's own shared memory in the kernel without the reservation
    table_off: int
    reserve_bytes: int
    shared: int  # metadata.shared of the kernel that runs

    def constexprs(self) -> dict:
        return {
            "TABLE_OFF": self.table_off,
            "RESERVE_WORDS": self.reserve_bytes // 4,
            "ACQUIRE_ASM": acquire_asm(self.table_off, self.table_off + self.table_bytes),
        }


def plan_shared(compile_shared, table: int) -> SharedPlan:
    """Place the table from two compiles; ``compile_shared(constexpr overrides) -> metadata.shared``.

    The probe (no reservation) measures Triton's own use ``s``; the table goes above it, at 0 when ``s == 0``,
    else at the top of a power-of-two reservation (``tl.arange`` sizes are powers of two). Raises when the real
    compile's ``metadata.shared`` does not cover the table: launching it would read past the allocation."""
    # never launched; Triton declares global_smem only when it allocates some, so the probe must not name it
    probe = compile_shared({"TABLE_OFF": 0, "RESERVE_WORDS": 0, "ACQUIRE_ASM": PROBE_ACQUIRE_ASM})
    reserve = table if probe == 0 else triton.next_power_of_2(table + probe)
    plan = SharedPlan(table, probe, reserve - table, reserve, 0)
    shared = compile_shared(plan.constexprs())
    if shared < reserve:
        raise RuntimeError(
            f"the smem-table gemv compiled with {shared} bytes of shared memory for a {reserve}-byte reservation "
            f"(table {table} at offset {plan.table_off}): this Triton sizes the reserving gather differently"
        )
    return SharedPlan(table, probe, plan.table_off, reserve, shared)


def table_constexprs(group_size: int, ncopies: int, bf16: bool) -> dict:
    """The staging and gather asm constexprs every shared-table kernel takes (:func:`_setup_table`, :func:`_gather`)."""
    gather, gather_cons = gather_asm(group_size, ncopies, bf16)
    load, load_cons = load_words_asm(group_size)
    store, store_cons = store_words_asm(group_size)
    return dict(
        NCOPIES=ncopies,
        GATHER_ASM=gather,
        GATHER_CONS=gather_cons,
        LOAD_ASM=load,
        LOAD_CONS=load_cons,
        STORE_ASM=store,
        STORE_CONS=store_cons,
    )


def kernel_args(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    nbits: int,
    out: torch.Tensor,
    cfg: SmemGemvConfig,
) -> tuple[tuple, dict]:
    """Positional runtime arguments and constexprs of :func:`_cb_gemv_smem_kernel` (all but the plan's)."""
    from .codebook import _codes_view

    num_out, num_groups, num_cb = codes.shape
    g = codebooks.shape[-1]
    ncopies = cfg.ncopies or default_ncopies(g)
    codes_l, packed, word_bits, stride_cn = _codes_view(codes, nbits)
    bf16_cb, bf16_x = codebooks.dtype == torch.bfloat16, x.dtype == torch.bfloat16
    args = (x, codes_l, codebooks, scales.reshape(-1), bias if bias is not None else scales.reshape(-1), out)
    args += (num_out, num_groups, triton.cdiv(num_out, cfg.block_n), x.stride(0), out.stride(0), stride_cn)
    xa, x_cons = x_asm(g, bf16_x)
    kwargs = dict(
        NUM_CODEBOOKS=num_cb,
        NBITS=nbits,
        G=g,
        PACKED=packed,
        WORD_BITS=word_bits,
        HAS_BIAS=bias is not None,
        BLOCK_N=cfg.block_n,
        BLOCK_G=cfg.block_g,
        X_ASM=xa,
        X_CONS=x_cons,
        **table_constexprs(g, ncopies, bf16_cb),
        num_warps=cfg.num_warps,
        num_stages=1,  # a pipelined loop would stage its loads through Triton's shared memory, under the table
    )
    return args, kwargs


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """Contiguous with a 16-byte aligned start: the asm reads whole codewords and x groups as vectors."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


_PLANS: dict[tuple, SharedPlan] = {}


def _plan_key(kernel, args: tuple, kwargs: dict, device: torch.device) -> tuple:
    scalars = tuple((v % 16 == 0, v == 1) for v in args if isinstance(v, int))  # the runtime's specialisation
    dtypes = tuple(a.dtype for a in args if isinstance(a, torch.Tensor))
    return (kernel.fn.__name__, device, dtypes, scalars, tuple(sorted(kwargs.items())))


def plan_for(kernel, args: tuple, kwargs: dict, device: torch.device) -> SharedPlan:
    """:func:`plan_shared` for one shared-table ``kernel`` through ``warmup`` compiles (no launch), once per
    kernel specialisation; ``kwargs`` holds the kernel's table constexprs (``NUM_CODEBOOKS``, ``NBITS``, ...)."""
    key = _plan_key(kernel, args, kwargs, device)
    if key not in _PLANS:
        num_cb, nbits, g = kwargs["NUM_CODEBOOKS"], kwargs["NBITS"], kwargs["G"]
        warm = functools.partial(kernel.warmup, *args, grid=(1,))
        table = table_bytes(num_cb, nbits, g, kwargs["NCOPIES"])
        _PLANS[key] = plan_shared(lambda over: warm(**kwargs, **over).metadata.shared, table)
    return _PLANS[key]


def resident_ctas(plan: SharedPlan, cap: int) -> int:
    """CTAs one SM holds with this plan's shared memory (each also costs the driver's 1 KB), at most ``cap``:
    the persistent grid's size per SM."""
    return max(1, min(cap, SMEM_PER_SM // (plan.shared + SMEM_PER_CTA_RESERVED)))


def shared_plan(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    nbits: int,
    config: SmemGemvConfig | None = None,
) -> SharedPlan:
    """The shared-memory plan :func:`codebook_gemv_smem` launches this call with (benchmarks record it)."""
    out = torch.empty(x.shape[0], codes.shape[0], dtype=x.dtype, device=x.device)
    args, kwargs = kernel_args(
        _aligned(x), codes, _aligned(codebooks), scales, bias, nbits, out, config or SmemGemvConfig()
    )
    return plan_for(_cb_gemv_smem_kernel, args, kwargs, x.device)


def codebook_gemv_smem(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    nbits: int,
    config: SmemGemvConfig | None = None,
) -> torch.Tensor:
    """``x [T, K] -> [T, N]`` (T small: one persistent program set per token) from a shared-memory table."""
    cfg = config or SmemGemvConfig()
    if not supports(x, codes, codebooks, nbits, cfg.ncopies):
        raise ValueError("the smem-table gemv takes fp16/bf16 1x8_g4 / 2x8_g8-like layers with uint8 codes")
    if codes.shape[1] * codebooks.shape[-1] != x.shape[-1]:
        raise ValueError(f"x has {x.shape[-1]} features, codes expect {codes.shape[1] * codebooks.shape[-1]}")
    x, codebooks = _aligned(x), _aligned(codebooks)
    out = torch.empty(x.shape[0], codes.shape[0], dtype=x.dtype, device=x.device)
    if x.shape[0] == 0:
        return out
    args, kwargs = kernel_args(x, codes, codebooks, scales, bias, nbits, out, cfg)
    plan = plan_for(_cb_gemv_smem_kernel, args, kwargs, x.device)
    from .codebook import _num_sms

    resident = resident_ctas(plan, cfg.ctas_per_sm)
    programs = min(args[8], resident * _num_sms(x.device))
    _cb_gemv_smem_kernel[(programs, x.shape[0])](*args, **kwargs, **plan.constexprs())
    return out


# ------------------------------------------------------------------------------- the layout, in torch


def banked_offsets(codes: torch.Tensor, lanes: torch.Tensor, group_size: int, ncopies: int, table_off: int = 0):
    """Byte offsets the gather asm reads for entry indices ``codes`` (codebook m's entries are
    ``m * 2**B + code``) from lanes ``lanes``: ``table_off + (entry * NCOPIES + lane % NCOPIES) * 2G``."""
    return table_off + (codes * ncopies + (lanes & (ncopies - 1))) * (2 * group_size)


def banked_table(codebooks: torch.Tensor, ncopies: int) -> torch.Tensor:
    """The staged table as bytes, ``[M * 2**B * NCOPIES * 2G]`` uint8, written as :func:`_stage_table` writes it:
    entry ``e`` (codebook-major), copy ``c`` at ``(e * NCOPIES + c) * 2G``."""
    m, n, _, g = codebooks.shape
    entries = codebooks.reshape(m * n, g).contiguous()
    table = torch.empty(m * n * ncopies, g, dtype=codebooks.dtype)
    e = torch.arange(m * n)
    for c in range(ncopies):
        table[e * ncopies + c] = entries
    return table.view(torch.uint8).reshape(-1)


def banked_lookup(
    table: torch.Tensor, entries: torch.Tensor, lanes: torch.Tensor, group_size: int, ncopies: int, dtype: torch.dtype
) -> torch.Tensor:
    """Read codewords back from :func:`banked_table` bytes at :func:`banked_offsets` (the kernel's reads)."""
    offs = banked_offsets(entries, lanes, group_size, ncopies)
    idx = offs[..., None] + torch.arange(2 * group_size)
    return table[idx].view(dtype)


def bank_groups(offsets: torch.Tensor, width: int) -> torch.Tensor:
    """First bank (of 32, 4 bytes each) an access of ``width`` bytes at ``offsets`` touches."""
    return (offsets // 4) % 32
