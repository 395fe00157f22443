"""The trellis quantizer: Viterbi codes inside block-LDLQ error feedback, in a rotated basis.

For each linear: rotate (``W_r = W R``, ``H_r = R^T H R``), fix each row's fp16 scale (its RMS times the
multiplier, of a few, whose walks fit the first rows best), then code the columns ``tile_cols`` at a time:
each block's ``tile_rows x tile_cols`` tiles are one Viterbi walk each, and the block's error is fed
forward to the columns not yet coded through the Cholesky factor of ``H_r^-1`` (GPTQ/LDLQ), so the walk
minimises the layer's output error rather than the weights' own. See :mod:`lit_cb.trellis` for the format.
"""

from __future__ import annotations

import torch

from lit_cb.configs.trellis import TrellisConfig  # noqa: F401 (re-exported: the config lives torch-free)
from lit_cb.quant.gptq import upper_cholesky_of_inverse
from lit_cb.quant.registry import register_method
from lit_cb.trellis import TrellisLinear, block_ldlq, computed_values, input_rotation, viterbi

SCALE_MULTIPLIERS = (0.8, 0.85, 0.9, 0.95, 1.0, 1.05)


def search_walks(x: torch.Tensor, values: torch.Tensor, k: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`lit_cb.trellis.viterbi`'s walks: through the Triton kernel where it runs (a GPU; one launch per call
    instead of about ten per step: a 576 x 576 layer in 0.04 s against 3.5 s on an H100,
    bench/results/viterbi_h100.json), else in PyTorch. Both give the same walks up to exact ties."""
    try:
        from lit_cb.kernels import viterbi as kernels
    except ImportError:  # no triton
        kernels = None
    if kernels is not None and kernels.supports(x):
        return kernels.viterbi_walks(x, values, k, weights=weights)
    return viterbi(x, values, k, weights=weights)


def row_scales(w: torch.Tensor, values: torch.Tensor, k: int, probe_rows: int = 32) -> torch.Tensor:
    """Each row's RMS times the multiplier (of :data:`SCALE_MULTIPLIERS`) whose walks fit the first ``probe_rows``
    rows best in plain squared error: the unit-variance values reach a Gaussian row's spread (``[rows, 1]``)."""
    rms = w.pow(2).mean(dim=1, keepdim=True).sqrt().clamp_min(1e-12)
    probe = w[:probe_rows] / rms[:probe_rows]

    def err(mult: float) -> float:
        return float(((probe - mult * values[search_walks(probe / mult, values, k)]) ** 2).sum())

    return rms * min(SCALE_MULTIPLIERS, key=err)


def ldlq_walks(
    target: torch.Tensor,
    u: torch.Tensor,
    values: torch.Tensor,
    k: int,
    tile_rows: int,
    tile_cols: int,
    column_weights: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Code ``target`` (float64 ``[rows, n]``, rotated and divided by the row scales) ``tile_cols`` columns at a
    time inside :func:`block_ldlq` (``u``: the upper Cholesky factor of ``H^-1``), each block's
    ``tile_rows x tile_cols`` tiles one Viterbi walk each (row by row). ``column_weights`` weighs each column's
    squared error in the walk by the diagonal of the block's own error weight ``U_BB^-1 U_BB^-T`` (the walk
    cannot take its off-diagonal part). Returns the coded matrix (float64) and the walks ``[tiles, steps]`` in
    the tile order of :func:`lit_cb.trellis.tiles_to_matrix` (column block major)."""
    row_tiles = target.shape[0] // tile_rows
    walks: list[torch.Tensor] = []
    vals64 = values.double()

    def code(x: torch.Tensor) -> torch.Tensor:  # [rows, tile_cols] -> coded
        b0 = len(walks) * tile_cols
        d = None
        if column_weights:
            inv = torch.linalg.inv(u[b0 : b0 + tile_cols, b0 : b0 + tile_cols])
            diag = (inv @ inv.T).diagonal()
            d = (diag / diag.mean()).repeat(tile_rows)  # the walk goes row by row through the tile
        states = search_walks(x.reshape(row_tiles, tile_rows * tile_cols).float(), values, k, weights=d)
        walks.append(states)
        return vals64[states].reshape(x.shape)

    coded, _ = block_ldlq(target, u, tile_cols, code)
    return coded, torch.cat(walks)


@register_method(TrellisConfig, "trellis")
def quantize_trellis(
    weight: torch.Tensor, hessian: torch.Tensor, config: TrellisConfig, bias: torch.Tensor | None = None
) -> TrellisLinear:
    """Compress ``weight`` ``[out, in]`` with its input second moment ``hessian`` ``[in, in]`` into a
    :class:`TrellisLinear` (codes by Viterbi in block-LDLQ feedback; module docstring)."""
    out_f, in_f = weight.shape
    fmt = config.layer_format(out_f, in_f, bias is not None)
    dev, k = weight.device, config.bits_per_step
    rot = input_rotation(in_f, config.rotation_seed)
    wr = rot.rotate(weight.double())
    hr = rot.rotate_hessian(hessian.to(dev, torch.float64))
    values = computed_values(config.state_bits, dev)
    scale = row_scales(wr.float(), values, k).half().float()
    u = upper_cholesky_of_inverse(hr, config.damp)
    _, states = ldlq_walks(wr / scale.double(), u, values, k, config.tile_rows, config.tile_cols, config.column_weights)
    return TrellisLinear.from_walks(fmt, states, scale, bias)
