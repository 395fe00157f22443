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
from lit_cb.trellis import TrellisFormat, TrellisLinear, block_ldlq, computed_values, input_rotation, viterbi

SCALE_MULTIPLIERS = (0.8, 0.85, 0.9, 0.95, 1.0, 1.05)


def row_scales(w: torch.Tensor, values: torch.Tensor, k: int, probe_rows: int = 32) -> torch.Tensor:
    """Each row's RMS times the multiplier (of :data:`SCALE_MULTIPLIERS`) whose walks fit the first ``probe_rows``
    rows best in plain squared error: the unit-variance values reach a Gaussian row's spread (``[rows, 1]``)."""
    rms = w.pow(2).mean(dim=1, keepdim=True).sqrt().clamp_min(1e-12)
    probe = w[:probe_rows] / rms[:probe_rows]

    def err(mult: float) -> float:
        return float(((probe - mult * values[viterbi(probe / mult, values, k)]) ** 2).sum())

    return rms * min(SCALE_MULTIPLIERS, key=err)


@register_method(TrellisConfig, "trellis")
def quantize_trellis(
    weight: torch.Tensor, hessian: torch.Tensor, config: TrellisConfig, bias: torch.Tensor | None = None
) -> TrellisLinear:
    """Compress ``weight`` ``[out, in]`` with its input second moment ``hessian`` ``[in, in]`` into a
    :class:`TrellisLinear` (codes by Viterbi in block-LDLQ feedback; module docstring)."""
    out_f, in_f = weight.shape
    fmt = TrellisFormat(
        in_f,
        out_f,
        config.state_bits,
        config.bits_per_step,
        config.tile_rows,
        config.tile_cols,
        config.rotation_seed,
        bias is not None,
    )
    dev, k = weight.device, config.bits_per_step
    rot = input_rotation(in_f, config.rotation_seed)
    wr = rot.rotate(weight.double())
    hr = rot.rotate_hessian(hessian.to(dev, torch.float64))
    values = computed_values(config.state_bits, dev)
    scale = row_scales(wr.float(), values, k).half().float()
    u = upper_cholesky_of_inverse(hr, config.damp)
    row_tiles, tc = out_f // config.tile_rows, config.tile_cols
    walks: list[torch.Tensor] = []
    vals64 = values.double()

    def code(x: torch.Tensor) -> torch.Tensor:  # [out, tile_cols] -> coded, one walk per tile of tile_rows rows
        b0 = len(walks) * tc
        d = None
        if config.column_weights:
            inv = torch.linalg.inv(u[b0 : b0 + tc, b0 : b0 + tc])
            diag = (inv @ inv.T).diagonal()
            d = (diag / diag.mean()).repeat(config.tile_rows)  # the walk goes row by row through the tile
        states = viterbi(x.reshape(row_tiles, fmt.steps).float(), values, k, weights=d)
        walks.append(states)
        return vals64[states].reshape(x.shape)

    block_ldlq(wr / scale.double(), u, tc, code)
    states = torch.cat(walks)  # [col_blocks * row_tiles, steps]: tile b * row_tiles + r
    return TrellisLinear.from_walks(fmt, states, scale, bias)
