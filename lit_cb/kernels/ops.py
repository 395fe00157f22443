"""Torch custom ops around the Triton launchers, so torch.compile and CUDA graphs see one opaque,
shape-inferable op (``register_fake``) and autograd reaches the input through it (``register_autograd``).

* ``lit_cb::codebook_linear(x, codes, codebooks, scales, bias, nbits, algo)`` -> ``[..., out_features]``
* ``lit_cb::codebook_linear_grad_input(grad_out, codes, codebooks, scales, nbits)`` -> ``[..., in_features]``
* ``lit_cb::codebook_linear_fused(x, codes, codebooks, scales, bias, nbits, algo, part_sizes)`` -> the
  concatenated outputs of several layers on one input (q/k/v, gate/up) in one launch; inference only
  (:class:`lit_cb.fused.FusedCodebookLinear`), so it registers no autograd.

Gradients flow to ``x`` and ``bias`` only. Codebooks and scales get none here: when they require grad the
layer-facing :func:`codebook_linear` takes the differentiable PyTorch reference instead.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from . import codebook as K

ALGOS = ("gemv", "lut", "mm", "dense", "dense_chunked")
FUSED_ALGOS = ("gemv", "mm", "dense")  # the families that take stacked per-part codebooks


def algos_for(nbits: int) -> tuple[str, ...]:
    """The kernel families that take this codebook width (``lut`` keeps a 2**B-row table on chip)."""
    return tuple(a for a in ALGOS if a != "lut" or K.LUT_MIN_NBITS <= nbits <= K.LUT_MAX_NBITS)


def _num_sms(device: torch.device) -> int:
    return K._num_sms(device)


def _split_k(programs: int, k_tiles: int, num_sms: int) -> int:
    """Input splits so that about two programs run per SM: a 4096-row output at 32 tokens has only 64
    row tiles of 64 for 132 SMs, each walking the whole input alone."""
    if programs >= 2 * num_sms:
        return 1
    return max(1, min(8, k_tiles // 4, -(-2 * num_sms // programs)))


# ----------------------------------------------------------------------------- per-shape tile choice
#
# The tiles below are the winners of the issue-10 H100 sweep, bench/results/kernels_sweep_h100.json
# ("summary": best variant per "<out>x<in> b<tokens> <format>"; command and date inside the JSON). They are
# chosen by shape class, not by exact shape, so that unmeasured layers get the tile of their class:
#
# * ``narrow``: out_features <= in_features (o_proj, down_proj, square layers): few row tiles, so small
#   row blocks and long input steps keep every SM busy.
# * ``wide``:   out_features > in_features and fewer than 2**27 weights (gate/up of 7B-13B, fused q/k/v
#   and gate/up): enough rows that 4-row programs fill the GPU many times over.
# * ``huge``:   out_features > in_features and >= 2**27 weights (the 70B MLP, 28672x8192): more codes per
#   program amortise the per-program setup.
#
# and by group-size class (codewords of >= 8 inputs, the 2x8/1x16 formats, vs 4-input codewords). Each entry
# names the summary rows it comes from; the two near-ties where the class rule runs another tile than the
# row's winner say so. Formats or shapes the sweep did not measure (1x16_g8, 8192x8192, ...) take their class's tile.

NARROW, WIDE, HUGE = "narrow", "wide", "huge"
HUGE_WEIGHTS = 2**27  # between 11008x4096 (45M, measured wide) and 28672x8192 (235M, measured huge)


def shape_class(num_out: int, in_features: int) -> str:
    """``narrow`` / ``wide`` / ``huge`` (see above): the key of the tile tables."""
    if num_out <= in_features:
        return NARROW
    return HUGE if num_out * in_features >= HUGE_WEIGHTS else WIDE


# batch 1-2, gemv: (shape class, group size >= 8) -> (rows per program, inputs per step, warps, stages)
GEMV_TILES: dict[tuple[str, bool], tuple[int, int, int, int]] = {
    # "4096x4096 b1 2x8_g8" gemv(prev) 11.70 us, "4096x11008 b1 2x8_g8" gemv(prev) 24.77 us
    (NARROW, True): (8, 1024, 8, 2),
    # "4096x11008 b1 1x8_g4" gemv(prev) 19.04 us; "4096x4096 b1 1x8_g4" won by n4_k1024_w4 at 8.52 us,
    # this tile 8.62 us (1% off)
    (NARROW, False): (8, 1024, 8, 2),
    # "11008x4096 b1 2x8_g8" gemv_n4_k1024_w4_s2 24.30 us (was 29.47)
    (WIDE, True): (4, 1024, 4, 2),
    # "11008x4096 b1 1x8_g4" gemv_n4_k1024_w4_s2 19.51 us (was 19.86)
    (WIDE, False): (4, 1024, 4, 2),
    # "28672x8192 b1 2x8_g8" gemv_n8_k2048_w8_s2 105.38 us (was 113.21)
    (HUGE, True): (8, 2048, 8, 2),
    # "28672x8192 b1 1x8_g4" gemv_n16_k512_w8_s2 76.28 us (was 81.82)
    (HUGE, False): (16, 512, 8, 2),
}

# batch 1-4 through per-input lookup tables (table_gemv.py, its DISPATCH_CONFIG) instead of the gemv: (shape
# class, several codebooks) where the H100 sweep measured them ahead (results/table_sweep_h100.json, batch 1):
# "28672x8192 2x8_g8" 96.44 us against the gemv's 105.15 (1.59x fp16 against 1.46x); "11008x4096 2x8_g8" 24.51
# both (a tie: the gemv stays); one codebook (1x8_g4) the gemv ahead on both (82.17 / 19.99 against 94.74 / 23.78)
TABLE_GEMV_SHAPES: set[tuple[str, bool]] = {(HUGE, True)}

# 2-16 tokens, mm: shape class -> (block_m, block_n, inputs per K step, warps, split_k); num_stages=1
MM_DECODE_TILES: dict[str, tuple[int, int, int, int, int]] = {
    # "4096x4096 b16" and "4096x11008 b16", both formats: mm_m16_n32_k256_w4_split4 (20.76 / 15.21 /
    # 48.26 / 33.76 us, was 29.92 / 23.70 / 76.50 / 59.84)
    NARROW: (16, 32, 256, 4, 4),
    # "11008x4096 b16", both formats: mm_m16_n64_k128_w4_split4 (52.15 / 33.73 us, was 55.41 / 39.35)
    WIDE: (16, 64, 128, 4, 4),
    # "28672x8192 b16", both formats: mm_m16_n64_k128_w4_split4 (209.32 / 133.24 us, was 263.58 / 162.91)
    HUGE: (16, 64, 128, 4, 4),
}

# prefill, dense (dequant tile feeding cuBLAS): shape class -> (rows per program, inputs per program, warps)
DEQUANT_TILES: dict[str, tuple[int, int, int]] = {
    # "4096x4096 b2048 2x8_g8" dense_n2_k2048_w8 107.34 us, "4096x11008 b2048" both formats dense_n2_k2048_w8
    # (292.12 / 279.85 us); "4096x4096 b2048 1x8_g4" won by the previous 8x512 tile at 109.97 us, this tile
    # 114.30 us (4% off, within the cuBLAS run-to-run spread of that row)
    NARROW: (2, 2048, 8),
    # "11008x4096 b2048" both formats dense_n4_k1024_w4 (300.08 / 287.56 us, was 335.08 / 326.10)
    WIDE: (4, 1024, 4),
    # "28672x8192 b2048" both formats dense_n4_k1024_w4 (1484.42 / 1583.50 us, was 1714.82 / 1597.74)
    HUGE: (4, 1024, 4),
}


def _mm_config(
    tokens: int, num_out: int, in_features: int, group_size: int, num_groups: int = 0, num_sms: int = 0
) -> K.MMConfig:
    """Tiles for the decode-into-dot kernel: :data:`MM_DECODE_TILES` up to 16 tokens; 64-token tiles with a
    split-K heuristic up to 64 (not in the sweep); 128x128 pipelined tiles beyond.

    num_stages=1 for decode sizes: with software pipelining Triton turns the codeword gathers into
    cp.async copies to shared memory read back one half at a time (seen in the PTX), several times slower.
    """
    if tokens <= 16:
        bm, bn, bk, warps, split = MM_DECODE_TILES[shape_class(num_out, in_features)]
        return K.MMConfig(
            block_m=bm, block_n=bn, block_g=max(1, bk // group_size), num_warps=warps, num_stages=1, split_k=split
        )
    if tokens > 64:
        return K.MMConfig(block_m=128, block_n=128, block_g=max(2, 32 // group_size), num_warps=4, num_stages=4)
    cfg = K.MMConfig(block_m=64, block_n=64, block_g=max(1, 128 // group_size), num_warps=4, num_stages=1)
    if num_sms and num_groups:
        programs = -(-tokens // cfg.block_m) * -(-num_out // cfg.block_n)
        split = _split_k(programs, -(-num_groups // cfg.block_g), num_sms)
        if split > 1:
            cfg = dataclasses.replace(cfg, split_k=split)
    return cfg


def _gemv_config(num_out: int, in_features: int, group_size: int) -> K.GemvConfig:
    """:data:`GEMV_TILES` by shape class and group size."""
    bn, bk, warps, stages = GEMV_TILES[(shape_class(num_out, in_features), group_size >= 8)]
    return K.GemvConfig(block_n=bn, block_g=max(1, bk // group_size), num_warps=warps, num_stages=stages)


def _lut_config(tokens: int, num_cb: int) -> K.LutConfig:
    """32 table columns (groups x codebooks) per K tile: a 32 KB fp32 table for B = 8."""
    return K.LutConfig(block_g=max(1, 32 // num_cb), block_n=128, programs_per_sm=2, num_warps=4, num_stages=2)


def _dequant_config(num_out: int, in_features: int, group_size: int) -> K.DequantConfig:
    """:data:`DEQUANT_TILES` by shape class: long row segments per program (the sweep's dequant alone on
    11008x4096: 45.1 / 40.7 us for 2x8_g8 / 1x8_g4 with this tile, 53.1 / 44.5 with the previous 16x512 / 8x512).
    Also the transient W of the input gradient in training."""
    bn, bk, warps = DEQUANT_TILES[shape_class(num_out, in_features)]
    return K.DequantConfig(block_n=bn, block_g=max(1, bk // group_size), num_warps=warps)


def kernel_config(
    algo: str, tokens: int, num_out: int, in_features: int, group_size: int, num_cb: int = 1, num_sms: int = 0
):
    """The tile config the dispatcher launches ``algo`` with for this call (what :func:`run_algo` uses;
    benchmarks record it). ``num_out`` is the total output rows (all parts of a fused layer)."""
    if algo == "gemv":
        return _gemv_config(num_out, in_features, group_size)
    if algo == "lut":
        return _lut_config(tokens, num_cb)
    if algo == "mm":
        return _mm_config(tokens, num_out, in_features, group_size, in_features // group_size, num_sms)
    if algo in ("dense", "dense_chunked"):
        return _dequant_config(num_out, in_features, group_size)
    raise ValueError(f"unknown algo {algo!r}; expected one of {ALGOS}")


def run_algo(
    x2d: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    nbits: int,
    algo: str,
    part_sizes: list[int] | None = None,
) -> torch.Tensor:
    """One kernel family on a 2-D input, with the tiles of :func:`kernel_config`. ``part_sizes`` (with stacked
    ``[P, M, 2**B, 1, G]`` codebooks) runs a fused layer, tiled by its total shape; ``lut`` and
    ``dense_chunked`` take one part, so a fused call asking for them runs ``gemv`` / ``dense`` instead."""
    tokens, g, num_out, in_features = x2d.shape[0], codebooks.shape[-1], codes.shape[0], x2d.shape[1]
    if part_sizes is not None:
        algo = {"lut": "gemv", "dense_chunked": "dense"}.get(algo, algo)
    if algo not in ALGOS:
        raise ValueError(f"unknown algo {algo!r}; expected one of {ALGOS}")
    num_sms = _num_sms(x2d.device) if algo == "mm" else 0
    cfg = kernel_config(algo, tokens, num_out, in_features, g, codes.shape[2], num_sms)
    if algo == "gemv":
        if _table_gemv(x2d, codes, codebooks, nbits):
            from . import table_gemv

            codes_il = table_gemv.layer_codes(codes)
            cfg_t = table_gemv.DISPATCH_CONFIG
            return table_gemv.table_gemv(x2d, codes_il, codebooks, scales, bias, nbits, cfg_t, part_sizes=part_sizes)
        if part_sizes is None and _smem_tables(x2d, codes, codebooks, nbits):
            from . import smem_table

            smem_cfg = smem_table.smem_config(g)
            return smem_table.codebook_gemv_smem(x2d, codes, codebooks, scales, bias, nbits, smem_cfg)
        return K.codebook_gemv(x2d, codes, codebooks, scales, bias, nbits, cfg, part_sizes)
    if algo == "lut":
        return K.codebook_lut_gemv(x2d, codes, codebooks, scales, bias, nbits, cfg)
    if algo == "mm":
        if part_sizes is None and _smem_tables_mm(x2d, codes, codebooks, nbits):
            from . import smem_mm

            smem_cfg = smem_mm.mm_config(tokens, g)
            return smem_mm.codebook_mm_smem(x2d, codes, codebooks, scales, bias, nbits, smem_cfg)
        return K.codebook_mm(x2d, codes, codebooks, scales, bias, nbits, cfg, part_sizes)
    if algo == "dense":
        return K.codebook_dense(x2d, codes, codebooks, scales, bias, nbits, cfg, part_sizes)
    return K.codebook_dense_chunked(x2d, codes, codebooks, scales, bias, nbits, cfg)


def _table_gemv(x2d: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, nbits: int) -> bool:
    """Whether a ``gemv`` call runs the lookup-table matvec (lit_cb/kernels/table_gemv.py), for the layers it takes
    (fused ones too): by :data:`TABLE_GEMV_SHAPES` unless ``LIT_CB_TABLE_GEMV`` forces it on (1) or off (0)."""
    from . import table_gemv

    if not table_gemv.supports(x2d, codes, codebooks, nbits):
        return False
    forced = table_gemv.forced()
    if forced is not None:
        return forced
    num_out, in_features = codes.shape[0], x2d.shape[1]
    return (shape_class(num_out, in_features), codes.shape[2] >= 2) in TABLE_GEMV_SHAPES and x2d.is_cuda


def _smem_tables(x2d: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, nbits: int) -> bool:
    """Whether a ``gemv`` call runs the shared-memory-table prototype (lit_cb/kernels/smem_table.py): only when
    opted in with ``LIT_CB_SMEM_TABLES=1``, on CUDA, never under TRITON_INTERPRET, for formats it takes."""
    from . import smem_table

    return smem_table.enabled() and x2d.is_cuda and smem_table.supports(x2d, codes, codebooks, nbits)


def _smem_tables_mm(x2d: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, nbits: int) -> bool:
    """Whether an ``mm`` call runs the shared-memory-table tensor-core prototype (lit_cb/kernels/smem_mm.py):
    the same opt-in as :func:`_smem_tables`, for the formats it takes, up to 64 tokens (what ``mm`` is dispatched
    for; 1-2 tokens go to the gemv family)."""
    from . import smem_mm, smem_table

    return smem_table.enabled() and x2d.is_cuda and smem_mm.supports(x2d, codes, codebooks, nbits)


@torch.library.custom_op("lit_cb::codebook_linear", mutates_args=())
def codebook_linear_op(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    nbits: int,
    algo: str,
) -> torch.Tensor:
    x2d = x.reshape(-1, x.shape[-1])
    out = run_algo(x2d, codes, codebooks, scales, bias, nbits, algo)
    return out.reshape(*x.shape[:-1], codes.shape[0])


@codebook_linear_op.register_fake
def _(x, codes, codebooks, scales, bias, nbits, algo):
    return x.new_empty(*x.shape[:-1], codes.shape[0])


@torch.library.custom_op("lit_cb::codebook_linear_grad_input", mutates_args=())
def codebook_linear_grad_input_op(
    grad_out: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, nbits: int
) -> torch.Tensor:
    """``grad_x = grad_out @ W``: a transient dense W (Triton dequant) and one cuBLAS matmul.

    Training batches are large (LoRA: thousands of tokens), where the dequant is a few percent of the
    matmul; small-batch backward is rare enough not to need its own kernel.
    """
    g2d = grad_out.reshape(-1, grad_out.shape[-1])
    g = codebooks.shape[3]
    cfg = _dequant_config(codes.shape[0], codes.shape[1] * g, g)
    w = K.codebook_dequant(codes, codebooks, scales, nbits, grad_out.dtype, cfg)  # [out_features, in_features]
    return (g2d @ w).reshape(*grad_out.shape[:-1], w.shape[1])


@torch.library.custom_op("lit_cb::codebook_linear_fused", mutates_args=())
def codebook_linear_fused_op(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    nbits: int,
    algo: str,
    part_sizes: list[int],
) -> torch.Tensor:
    x2d = x.reshape(-1, x.shape[-1])
    out = run_algo(x2d, codes, codebooks, scales, bias, nbits, algo, list(part_sizes))
    return out.reshape(*x.shape[:-1], codes.shape[0])


@codebook_linear_fused_op.register_fake
def _(x, codes, codebooks, scales, bias, nbits, algo, part_sizes):
    return x.new_empty(*x.shape[:-1], codes.shape[0])


@codebook_linear_grad_input_op.register_fake
def _(grad_out, codes, codebooks, scales, nbits):
    return grad_out.new_empty(*grad_out.shape[:-1], codes.shape[1] * codebooks.shape[3])


def _setup_context(ctx, inputs, output) -> None:
    x, codes, codebooks, scales, bias, nbits, algo = inputs
    ctx.save_for_backward(codes, codebooks, scales)
    ctx.nbits = nbits
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    codes, codebooks, scales = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.lit_cb.codebook_linear_grad_input(grad.contiguous(), codes, codebooks, scales, ctx.nbits)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[4]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, None, grad_bias, None, None


codebook_linear_op.register_autograd(_backward, setup_context=_setup_context)


def codebook_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    fmt,
    algo: str | None = None,
) -> torch.Tensor:
    """The callable :func:`lit_cb.kernels.dispatch.select_kernel` hands to ``CodebookLinear.forward``.

    When codebooks or scales are being trained the kernels cannot give them gradients, so this runs the
    differentiable reference (dequantize + ``F.linear``) instead; the selector cannot see that itself.
    """
    if torch.is_grad_enabled() and (codebooks.requires_grad or scales.requires_grad):
        from lit_cb.layers import dequantize_weight

        weight = dequantize_weight(codes, codebooks, scales, fmt.nbits_per_codebook).to(x.dtype)
        return F.linear(x, weight, None if bias is None else bias.to(x.dtype))
    if algo is None:
        from .dispatch import choose_algo

        algo = choose_algo(fmt, x.numel() // max(1, x.shape[-1]))
    return torch.ops.lit_cb.codebook_linear(x, codes, codebooks, scales, bias, fmt.nbits_per_codebook, algo)
