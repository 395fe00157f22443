"""Issue 10's last route, quality side: can a format whose codewords are *computed* from the code (no
table to gather, so no L1/shared-memory lookups in the kernel) match the codebook method at 2 bits?

The format probed is a bitshift trellis (the idea behind QTIP's computed codes; written here from the
description, not from its code): a row's weights w_1..w_T are coded by a walk through 2**L states where
each step shifts k new bits in, ``s_t = ((s_{t-1} << k) | b_t) mod 2**L``, so the walk costs k bits per
weight (plus L - k for the first state), and weight t is reconstructed as ``scale_row * v(s_t)``. The
value of a state, v(s), is computed by a hash: one multiply-add mod 2**32 and the sum of the four bytes
(Irwin-Hall, close to N(0, 1)); a kernel decodes a weight from its L-bit window with integer ops only.
Codes come from the Viterbi algorithm (the least-squares walk, exactly). Weights are first rotated by a
random orthogonal matrix on the input side (incoherence: the rotated rows are close to Gaussian); the
squared error is the same in both bases, so every variant's error is comparable.

Compared, per layer, at the same 2 bits per weight of codes, on SmolLM2-135M's real weights:
    kmeans_g4_b8          the codebook method as shipped (g4 B8, 256 learned codewords per layer), H = I
    kmeans_g4_b8_rotated  the same on the rotated weights
    trellis_L{L}          the computed-codes trellis (k = 2) for each L asked, on the rotated weights
    trellis_L{L}_table    the same walk with v(s) an i.i.d. N(0, 1) table (what the hash imitates)
The error is relative, ||W - W_hat||_F^2 / ||W||_F^2; i.i.d. Gaussian data at 2 bits cannot go below
2**-4 = 0.0625 (the rate-distortion bound). Plain squared error (H = I) on purpose: it measures what the
format can represent; the Hessian-aware versions of both (GPTVQ / LDLQ error feedback) are the next step
and not measured here.

    python bench/computed_codes_probe.py --layers 0.self_attn.q_proj,0.mlp.down_proj --rows 96 --out R.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lit_cb.quant.gptq import upper_cholesky_of_inverse
from lit_cb.quant.trellis import ldlq_walks, row_scales
from lit_cb.trellis import HASH_ADD, HASH_MUL, block_ldlq, computed_values, viterbi

__all__ = ["HASH_ADD", "HASH_MUL", "block_ldlq", "computed_values", "row_scales", "viterbi"]  # the tests use them
RD_BOUND_2BIT = 2.0**-4
TILE_WEIGHTS = 256  # weights per walk of the Hessian-aware variant (32 rows x 8 columns)


def table_values(nbits_state: int, seed: int) -> torch.Tensor:
    """An i.i.d. N(0, 1) value per state (a stored table: what the hash is meant to look like)."""
    return torch.randn(2**nbits_state, generator=torch.Generator().manual_seed(seed))


def trellis_quantize(w: torch.Tensor, values: torch.Tensor, k: int, chunk: int = 32) -> torch.Tensor:
    """Rows of ``w`` coded by :func:`viterbi` against ``scale_row * values``; the scale starts at the row's
    RMS times the best of a few multipliers (chosen on the first rows) and is refitted by least squares for the
    walk found, which can only lower each row's error."""
    scales = row_scales(w, values, k)
    out = torch.empty_like(w)
    for i in range(0, w.shape[0], chunk):
        scale = scales[i : i + chunk]
        v = values[viterbi(w[i : i + chunk] / scale, values, k)]
        ls = (w[i : i + chunk] * v).sum(1, keepdim=True) / v.pow(2).sum(1, keepdim=True).clamp_min(1e-12)
        out[i : i + chunk] = ls * v
    return out


def trellis_ldlq(
    w: torch.Tensor,
    hessian: torch.Tensor,
    values: torch.Tensor,
    k: int,
    rot: torch.Tensor,
    block_cols: int = 8,
    tile_rows: int = 32,
    column_weights: bool = False,
) -> torch.Tensor:
    """Hessian-aware trellis coding (block LDLQ): rotate, then code the columns ``block_cols`` at a time and
    feed each block's error forward to the columns not yet coded through the Cholesky factor U of H^-1
    (:func:`block_ldlq`). Inside a block the walk runs over a tile of ``tile_rows`` x ``block_cols`` weights
    (row by row; its own first state), so blocks stay narrow (the last block's error is weighted by the
    marginal H of its columns, which no later column can compensate, so it grows with the block's width)
    while every walk stays 256 steps long. Row scales (RMS x the best plain-MSE multiplier, fp16) are fixed
    before coding; the result is returned in the original basis. Rows must divide into tiles.
    ``column_weights`` weighs each column's squared error in the walk by the diagonal of the block's own
    error weight U_BB^-1 U_BB^-T (the walk cannot take its off-diagonal part)."""
    if w.shape[0] % tile_rows or w.shape[1] % block_cols:
        raise ValueError(f"{tuple(w.shape)} does not divide into {tile_rows} x {block_cols} tiles")
    wr = w @ rot
    hr = rot.T.double() @ hessian.double() @ rot.double()
    scale = row_scales(wr, values, k).half().float()
    u = upper_cholesky_of_inverse(hr, 0.01)
    coded, _ = ldlq_walks((wr / scale).double(), u, values, k, tile_rows, block_cols, column_weights)
    return ((coded * scale.double()) @ rot.T.double()).float()


def kmeans_quantize(w: torch.Tensor, hessian: torch.Tensor | None = None) -> torch.Tensor:
    """The shipped codebook method (g4 B8, GPTVQ weighting, the H100 recipes' 30 k-means iterations on every
    vector); with ``hessian`` None an identity Hessian, so plain squared error."""
    from lit_cb.configs.codebook import CodebookConfig
    from lit_cb.quant import registry

    layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
    layer.weight.data.copy_(w)
    cfg = CodebookConfig(in_group_size=4, nbits=8, weighting="gptvq", kmeans_iters=30, kmeans_max_points=None)
    h = torch.eye(w.shape[1]) if hessian is None else hessian
    return registry.quantize_linear(layer, h, cfg).dequantize().float()


def relative_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float((w.double() - w_hat.double()).pow(2).sum() / w.double().pow(2).sum())


def random_rotation(n: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))[None, :]).float()


def bits_per_weight(variant: str, rows: int, cols: int, nbits_state: int, k: int) -> float:
    """Stored bits per weight of the layer (rows x cols): codes + per-row fp16 scales + any table."""
    scales = 16 * rows
    if variant.startswith("kmeans"):
        return (2 * rows * cols + 256 * 4 * 16 + scales) / (rows * cols)
    table = 16 * 2**nbits_state if variant.endswith("_table") else 0
    walks = rows * cols // TILE_WEIGHTS if "_ldlq" in variant else rows  # a first state per walk
    return (k * rows * cols + (nbits_state - k) * walks + scales + table) / (rows * cols)


def probe_layer(w: torch.Tensor, rows: torch.Tensor | None, state_bits: list[int], k: int, seed: int) -> dict:
    """Every variant's relative error on the rows ``rows`` of ``w`` (all rows if None). The codebooks are
    fitted on the whole layer, as the method runs; the trellis codes each row on its own, so coding only the
    sampled rows estimates its whole-layer error without bias. Bits are those of the whole layer."""
    rot = random_rotation(w.shape[1], seed)
    wr = w @ rot
    sel = slice(None) if rows is None else rows
    out: dict = {"shape": list(w.shape), "rows_measured": w.shape[0] if rows is None else len(rows)}
    for name, src in (("kmeans_g4_b8", w), ("kmeans_g4_b8_rotated", wr)):
        t0 = time.perf_counter()
        out[name] = {
            "rel_err": relative_error(src[sel], kmeans_quantize(src)[sel]),
            "seconds": time.perf_counter() - t0,
        }
    for nb in state_bits:
        for name, vals in ((f"trellis_L{nb}", computed_values(nb)), (f"trellis_L{nb}_table", table_values(nb, seed))):
            t0 = time.perf_counter()
            err = relative_error(wr[sel], trellis_quantize(wr[sel], vals, k))
            out[name] = {"rel_err": err, "seconds": time.perf_counter() - t0, "state_bits": nb}
    for name, r in out.items():
        if isinstance(r, dict):
            r["bits_per_weight"] = bits_per_weight(name, w.shape[0], w.shape[1], r.get("state_bits", 0), k)
    return out


def probe_layer_hessian(
    w: torch.Tensor,
    hessian: torch.Tensor,
    rows: torch.Tensor | None,
    state_bits: list[int],
    k: int,
    seed: int,
    tile_rows: int = 32,
) -> dict:
    """Relative Hessian-weighted error tr(dW H dW^T) / tr(W H W^T) on ``rows`` (rows are independent under
    this objective, so a seeded subset estimates the layer's): the shipped codebook method with its
    Hessian against the trellis with block-LDLQ feedback (``_ldlq``; ``_ldlq_w`` with column weights in the
    walk), and the trellis without feedback."""
    from lit_cb.quant.objective import relative_layer_error

    sel = slice(None) if rows is None else rows
    rot = random_rotation(w.shape[1], seed)
    out: dict = {"shape": list(w.shape), "rows_measured": w.shape[0] if rows is None else len(rows)}
    t0 = time.perf_counter()
    w_hat = kmeans_quantize(w, hessian)
    out["codebook_g4_b8"] = {
        "rel_err": relative_layer_error(w[sel], w_hat[sel], hessian),
        "seconds": time.perf_counter() - t0,
    }
    for nb in state_bits:
        vals = computed_values(nb)
        for suffix, weighted in (("_ldlq", False), ("_ldlq_w", True)):
            t0 = time.perf_counter()
            w_hat = trellis_ldlq(w[sel], hessian, vals, k, rot, column_weights=weighted, tile_rows=tile_rows)
            out[f"trellis_L{nb}{suffix}"] = {
                "rel_err": relative_layer_error(w[sel], w_hat, hessian),
                "seconds": time.perf_counter() - t0,
                "state_bits": nb,
            }
        t0 = time.perf_counter()
        w_hat = trellis_quantize(w[sel] @ rot, vals, k) @ rot.T
        out[f"trellis_L{nb}"] = {
            "rel_err": relative_layer_error(w[sel], w_hat, hessian),
            "seconds": time.perf_counter() - t0,
            "state_bits": nb,
        }
    for name, r in out.items():
        if isinstance(r, dict):
            kind = "kmeans" if name.startswith("codebook") else name
            r["bits_per_weight"] = bits_per_weight(kind, w.shape[0], w.shape[1], r.get("state_bits", 0), k)
    return out


def calibration_hessians(model: nn.Module, names: list[str], config: Path) -> dict[str, torch.Tensor]:
    """H = X^T X / tokens of each named linear (``block.path``) on the calibration windows of ``config``'s
    data section (the float model: every layer sees float inputs)."""
    from lit_cb.config import load_config
    from lit_cb.data.datamodule import CompressionDataModule
    from lit_cb.hessian import attach_hessian_hooks, remove_hooks
    from lit_cb.models import decoder_layers, load_model

    cfg = load_config(config)
    _, tokenizer = load_model(cfg.model.name)
    windows = CompressionDataModule(tokenizer, cfg.data).calibration_windows()
    blocks = decoder_layers(model)
    linears = {n: blocks[int(n.split(".", 1)[0])].get_submodule(n.split(".", 1)[1]) for n in names}
    accs, handles = attach_hessian_hooks(linears)
    try:
        with torch.no_grad():
            for i in range(windows.shape[0]):
                model(input_ids=windows[i : i + 1], use_cache=False)
    finally:
        remove_hooks(handles)
    return {n: accs[n].hessian.float() for n in names}


def fake_quantize_blocks(
    model: nn.Module,
    windows: torch.Tensor,
    num_blocks: int,
    quantize: Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor],
) -> None:
    """Replace, in place, every linear weight of the first ``num_blocks`` blocks by ``quantize(name, W, H)``
    (dense: a quality probe, no format), block after block: each block's H comes from the calibration
    windows passed through the blocks already quantized, as the compression driver does, so errors compound
    as they would. One driver for every format, so their perplexities are paired."""
    from lit_cb.compress import capture_block_inputs, run_block
    from lit_cb.hessian import attach_hessian_hooks, remove_hooks
    from lit_cb.models import decoder_layers

    cpu = torch.device("cpu")
    inputs, kwargs = capture_block_inputs(model, windows, cpu, cpu)
    for i, block in enumerate(decoder_layers(model)[:num_blocks]):
        linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        accs, handles = attach_hessian_hooks(linears)
        try:
            run_block(block, inputs, kwargs, 4, cpu, collect=False)
        finally:
            remove_hooks(handles)
        with torch.no_grad():
            for n, m in linears.items():
                m.weight.copy_(quantize(f"{i}.{n}", m.weight.detach().float(), accs[n].hessian.float()))
        inputs = run_block(block, inputs, kwargs, 4, cpu)


def perplexity_probe(config: Path, num_blocks: int, nbits_state: int, k: int, seed: int, tile_rows: int = 32) -> dict:
    """WikiText-2 perplexity of the float model and of its first ``num_blocks`` blocks fake-quantized by the
    shipped codebook method and by the Hessian-aware trellis, on ``config``'s calibration and test windows."""
    from lit_cb.config import load_config
    from lit_cb.data.datamodule import CompressionDataModule
    from lit_cb.evaluate import perplexity
    from lit_cb.models import load_model

    cfg = load_config(config)
    model, tokenizer = load_model(cfg.model.name)
    dm = CompressionDataModule(tokenizer, cfg.data)
    windows, test = dm.calibration_windows(), dm.test_windows()
    vals = computed_values(nbits_state)
    quantizers = {
        "codebook_g4_b8": lambda name, w, h: kmeans_quantize(w, h),
        f"trellis_L{nbits_state}_ldlq": lambda name, w, h: trellis_ldlq(
            w, h, vals, k, random_rotation(w.shape[1], seed), column_weights=True, tile_rows=tile_rows
        ),
    }
    out = {"blocks": num_blocks, "float": perplexity(model, test, progress=False)}
    for name, fn in quantizers.items():
        m, _ = load_model(cfg.model.name)
        t0 = time.perf_counter()
        fake_quantize_blocks(m, windows, num_blocks, fn)
        out[name] = {"ppl": perplexity(m, test, progress=False), "seconds": time.perf_counter() - t0}
        print(name, out[name], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="0.self_attn.q_proj,0.mlp.down_proj", help="block.path of SmolLM2 linears")
    ap.add_argument("--rows", type=int, default=96, help="rows measured per layer (seeded), all if larger")
    ap.add_argument("--state-bits", default="8,12", help="comma-separated L (trellis state bits)")
    ap.add_argument("--k", type=int, default=2, help="bits per weight of the walk")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tile-rows", type=int, default=32, help="rows of a trellis tile (a walk: tile_rows x 8 weights)")
    ap.add_argument(
        "--hessian",
        type=Path,
        default=None,
        help="a run config whose calibration data gives each layer's H: compare Hessian-weighted errors, the "
        "codebook method with its Hessian against the trellis with block-LDLQ feedback",
    )
    ap.add_argument(
        "--ppl-blocks",
        type=int,
        default=0,
        help="with --hessian: also the WikiText-2 perplexity with the first N blocks fake-quantized by each "
        "format (codebook; trellis at the first --state-bits, column-weighted LDLQ)",
    )
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    state_bits = [int(x) for x in args.state_bits.split(",") if x]
    if args.k < 1 or any(nb <= args.k or nb > 16 for nb in state_bits):
        ap.error(f"--k {args.k} and --state-bits {state_bits}: need 1 <= k < L <= 16")
    if args.out.exists():
        ap.error(f"--out {args.out} exists; choose another path (nothing is overwritten)")
    if args.hessian is not None and not args.hessian.is_file():
        ap.error(f"--hessian {args.hessian}: no such config file")
    if args.ppl_blocks and (args.hessian is None or not 0 < args.ppl_blocks <= 30):
        ap.error(f"--ppl-blocks {args.ppl_blocks}: needs --hessian CONFIG and 1..30 blocks")
    from lit_cb.models import decoder_layers, load_model

    model, _ = load_model("smollm2")
    blocks = decoder_layers(model)
    specs = [s for s in args.layers.split(",") if s]
    hessians = calibration_hessians(model, specs, args.hessian) if args.hessian else None
    objective = "Hessian-weighted, calibration H" if hessians else "H = I"
    record: dict = {
        "what": f"relative squared error ({objective}) of 2-bit formats on SmolLM2-135M weights: learned "
        "codebook vs computed-codes bitshift trellis",
        "command": "python bench/computed_codes_probe.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out" and v is not None),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": f"CPU {platform.machine()} ({torch.get_num_threads()} threads)",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "rd_bound_gaussian_2bit": RD_BOUND_2BIT,
        "hash": {"mul": HASH_MUL, "add": HASH_ADD},
        "layers": {},
    }
    for spec in specs:
        idx, path = spec.split(".", 1)
        w = blocks[int(idx)].get_submodule(path).weight.detach().float()
        rows = None
        if args.rows < w.shape[0]:
            gen = torch.Generator().manual_seed(args.seed)
            rows = torch.randperm(w.shape[0], generator=gen)[: args.rows].sort().values
        if hessians is None:
            r = probe_layer(w, rows, state_bits, args.k, args.seed)
        else:
            r = probe_layer_hessian(w, hessians[spec], rows, state_bits, args.k, args.seed, args.tile_rows)
        record["layers"][spec] = r
        print(spec, {k: round(v["rel_err"], 4) for k, v in r.items() if isinstance(v, dict)}, flush=True)
    if args.ppl_blocks:
        record["perplexity"] = perplexity_probe(
            args.hessian, args.ppl_blocks, state_bits[0], args.k, args.seed, args.tile_rows
        )
    names = [n for n, v in next(iter(record["layers"].values())).items() if isinstance(v, dict)]
    record["mean_rel_err"] = {n: float(np.mean([r[n]["rel_err"] for r in record["layers"].values()])) for n in names}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print("mean", {n: round(v, 4) for n, v in record["mean_rel_err"].items()})


if __name__ == "__main__":
    main()
