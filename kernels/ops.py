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
    """Input splits so that about two programs run per SM: a 4096-row output at 16 tokens has only 128
    row tiles of 32 for 132 SMs, each walking the whole input alone."""
    if programs >= 2 * num_sms:
        return 1
    return max(1, min(8, k_tiles // 4, -(-2 * num_sms // programs)))


def _mm_config(tokens: int, num_out: int, group_size: int, num_groups: int = 0, num_sms: int = 0) -> K.MMConfig:
    """Tiles for the decode-into-dot kernel by token count, split-K where the output is narrow.

    num_stages=1 for decode sizes: with software pipelining Triton turns the codeword gathers into
    cp.async copies to shared memory read back one half at a time (seen in the PTX), several times slower.
    """
    if tokens <= 16:
        cfg = K.MMConfig(block_m=16, block_n=32, block_g=max(1, 256 // group_size), num_warps=4, num_stages=1)
    elif tokens <= 64:
        cfg = K.MMConfig(block_m=64, block_n=64, block_g=max(1, 128 // group_size), num_warps=4, num_stages=1)
    else:
        return K.MMConfig(block_m=128, block_n=128, block_g=max(2, 32 // group_size), num_warps=4, num_stages=4)
    if num_sms and num_groups:
        programs = -(-tokens // cfg.block_m) * -(-num_out // cfg.block_n)
        split = _split_k(programs, -(-num_groups // cfg.block_g), num_sms)
        if split > 1:
            cfg = dataclasses.replace(cfg, split_k=split)
    return cfg


def _gemv_config(tokens: int, num_out: int, group_size: int) -> K.GemvConfig:
    """1024 inputs x 8 rows a step, 8 warps: best or within 2% of the best of four tiles on all six
    issue shapes and the 2x8 / 1x16 / 1x8_g4 formats (H100 sweep, bench/results/kernels_h100.json),
    up to 2x faster than 16 rows x 256 inputs where out = 4096 (more programs in flight)."""
    return K.GemvConfig(block_n=8, block_g=max(1, 1024 // group_size), num_warps=8, num_stages=2)


def _lut_config(tokens: int, num_cb: int) -> K.LutConfig:
    """32 table columns (groups x codebooks) per K tile: a 32 KB fp32 table for B = 8."""
    return K.LutConfig(block_g=max(1, 32 // num_cb), block_n=128, programs_per_sm=2, num_warps=4, num_stages=2)


def _dequant_config(group_size: int) -> K.DequantConfig:
    """Wide row segments per program (H100 sweep: 2-3x faster than 32x32 tiles)."""
    if group_size <= 4:
        return K.DequantConfig(block_n=8, block_g=128, num_warps=4)
    return K.DequantConfig(block_n=16, block_g=64, num_warps=8)


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
    """One kernel family on a 2-D input, with the tile heuristics above. ``part_sizes`` (with stacked
    ``[P, M, 2**B, 1, G]`` codebooks) runs a fused layer; ``lut`` and ``dense_chunked`` take one part, so a
    fused call asking for them runs ``gemv`` / ``dense`` instead."""
    tokens, g, num_out = x2d.shape[0], codebooks.shape[-1], codes.shape[0]
    if part_sizes is not None:
        algo = {"lut": "gemv", "dense_chunked": "dense"}.get(algo, algo)
    if algo == "gemv":
        cfg = _gemv_config(tokens, num_out, g)
        return K.codebook_gemv(x2d, codes, codebooks, scales, bias, nbits, cfg, part_sizes)
    if algo == "lut":
        return K.codebook_lut_gemv(x2d, codes, codebooks, scales, bias, nbits, _lut_config(tokens, codes.shape[2]))
    if algo == "mm":
        cfg = _mm_config(tokens, num_out, g, codes.shape[1], _num_sms(x2d.device))
        return K.codebook_mm(x2d, codes, codebooks, scales, bias, nbits, cfg, part_sizes)
    if algo == "dense":
        return K.codebook_dense(x2d, codes, codebooks, scales, bias, nbits, _dequant_config(g), part_sizes)
    if algo == "dense_chunked":
        return K.codebook_dense_chunked(x2d, codes, codebooks, scales, bias, nbits, _dequant_config(g))
    raise ValueError(f"unknown algo {algo!r}; expected one of {ALGOS}")


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
    w = K.codebook_dequant(
        codes, codebooks, scales, nbits, grad_out.dtype, _dequant_config(codebooks.shape[3])
    )  # [out_features, in_features]
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
