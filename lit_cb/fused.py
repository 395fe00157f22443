"""Inference-time fusion of sibling compressed layers that read one input (q/k/v, gate/up) into one layer
with one kernel launch: :class:`~lit_cb.layers.CodebookLinear` and :class:`~lit_cb.trellis.TrellisLinear` layers.

A decode step at batch 1 is a chain of small launches, each too short to reach full memory bandwidth
(a 4096x4096 2-bit layer moves 4 MB). Concatenating q/k/v and gate/up turns seven launches per
transformer block into four, and the fused matvecs have 1.5x-3x the rows to spread over the SMs.

The fused layer stores the parts' codes concatenated along the output rows ``[sum N_p, K/g, M]``, their
codebooks stacked ``[P, M, 2**B, 1, g]`` (each part keeps its own) and scales and biases concatenated; the
kernels (``part_sizes`` in :mod:`lit_cb.kernels.codebook`) pick each row's codebooks by the part it lies in.

Fusion rewires a model in place without touching its attention/MLP code: the parent gets the fused layer
(``fused_q_proj_k_proj_v_proj``) and each original name becomes a :class:`FusedSlice` that returns its
columns of the fused output. The first slice called on an input computes the fused output; the others
reuse it while that same input tensor is passed (q, k and v are called on one ``hidden_states``). It is
an inference transform: save, load, LoRA and training run on the unfused model, which
:func:`unfuse_projections` restores exactly (codes, codebooks, scales, bias, low-rank terms).

Trellis layers (:class:`FusedTrellisLinear`) need no per-part table: the weight is computed from the codes, so the
fused layer is a :class:`~lit_cb.trellis.TrellisLinear` whose row tiles are the parts' row tiles in order, with
the parts' row scales, biases and low-rank terms. Parts must share the input rotation (one width, one rotation
seed), so the input is rotated once for all of them, as :meth:`TrellisLinear.rotated_input` already arranges.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lit_cb.layers import CodebookFormat, CodebookLinear, CompressedLinear, dequantize_weight
from lit_cb.trellis import TrellisLinear

# sibling projections that read the same input, in the layouts lit_cb compresses (Llama-style HF models)
DEFAULT_GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
MAX_PARTS = 4  # what the kernels take (lit_cb.kernels.codebook.MAX_PARTS)


def _shared_format(layers: Sequence[nn.Module]) -> str | None:
    """Why these layers cannot be fused, or None when they can."""
    if not 2 <= len(layers) <= MAX_PARTS:
        return f"{len(layers)} layers; fusion takes 2 to {MAX_PARTS}"
    first = layers[0]
    if type(first) is TrellisLinear:
        return _shared_trellis_format(layers)
    for layer in layers:
        if type(layer) is not CodebookLinear:
            return f"{type(layer).__name__} is not a plain CodebookLinear"
        f, f0 = layer.fmt, first.fmt
        same = (f.in_features, f.in_group_size, f.out_group_size, f.num_codebooks, f.nbits_per_codebook)
        if same != (f0.in_features, f0.in_group_size, f0.out_group_size, f0.num_codebooks, f0.nbits_per_codebook):
            return f"formats differ: {f0} vs {f}"
        if layer.codebooks.dtype != first.codebooks.dtype or layer.codebooks.device != first.codebooks.device:
            return "codebooks differ in dtype or device"
    return None


def _shared_trellis_format(layers: Sequence[nn.Module]) -> str | None:
    f0 = layers[0].fmt
    for layer in layers:
        if type(layer) is not TrellisLinear:
            return f"{type(layer).__name__} is not a plain TrellisLinear"
        if dataclasses.replace(layer.fmt, out_features=f0.out_features, bias=f0.bias) != f0:
            return f"formats differ: {f0} vs {layer.fmt}"
        if layer.scales.dtype != layers[0].scales.dtype or layer.codes.device != layers[0].codes.device:
            return "scales differ in dtype or codes in device"
    return None


def _stacked_low_rank(layers: Sequence[CompressedLinear], out_features: int):
    """The parts' low-rank terms as one pair (None, None without any): A stacked ``[sum r, in]``, B block-diagonal
    ``[out, sum r]``, so one pair of matmuls gives every part its own correction."""
    ranks = [layer.rank for layer in layers]
    if not any(ranks):
        return None, None
    a = torch.cat([layer.low_rank_a.data for layer in layers if layer.rank])
    b = a.new_zeros(out_features, a.shape[0])
    row = col = 0
    for layer in layers:
        if layer.rank:
            b[row : row + layer.out_features, col : col + layer.rank] = layer.low_rank_b.data
            col += layer.rank
        row += layer.out_features
    return nn.Parameter(a, requires_grad=False), nn.Parameter(b, requires_grad=False)


def _stacked_bias(layers: Sequence[nn.Module], like: torch.Tensor) -> nn.Parameter | None:
    if all(layer.bias is None for layer in layers):
        return None
    parts = [layer.bias.data if layer.bias is not None else like.new_zeros(layer.out_features) for layer in layers]
    return nn.Parameter(torch.cat(parts), requires_grad=False)


def _slot_formats(layers: Sequence[CompressedLinear]) -> list[tuple]:
    """Each part's low-rank slot format (bits and, for 8-bit slots, the per-component scales), for unfusing."""
    return [(layer.low_rank_bits, layer.low_rank_a_scale, layer.low_rank_b_scale) for layer in layers]


def _restore_low_rank(layer: CompressedLinear, fused, index: int) -> None:
    """Part ``index``'s low-rank term back from the fused pair (exact copies, in its slot format)."""
    rank = fused.part_ranks[index]
    if not rank:
        return
    start = sum(fused.part_sizes[:index])
    col = sum(fused.part_ranks[:index])
    rows = slice(start, start + fused.part_sizes[index])
    layer.low_rank_a = nn.Parameter(fused.low_rank_a.data[col : col + rank].clone(), requires_grad=False)
    layer.low_rank_b = nn.Parameter(fused.low_rank_b.data[rows, col : col + rank].clone(), requires_grad=False)
    bits, a_scale, b_scale = fused.part_slots[index]
    dev = layer.low_rank_a.device  # the fused layer may have moved since (its slot scales are not buffers)
    layer._set_low_rank_bits(bits, *(None if t is None else t.to(dev) for t in (a_scale, b_scale)))


class _Parts:
    """What a fused layer adds to its forward: part ``index``'s columns of the output, computed once per input."""

    part_sizes: list[int]
    _cache: list | None

    def _take_parts(self, layers: Sequence[nn.Module]):
        """Check that ``layers`` can be fused (ValueError naming why not) and record their heights and formats;
        returns the first one's format."""
        reason = _shared_format(layers)
        if reason is not None:
            raise ValueError(f"cannot fuse these layers: {reason}")
        self.part_sizes = [layer.out_features for layer in layers]
        self.part_formats = [layer.fmt for layer in layers]
        return layers[0].fmt

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Part ``index``'s output on ``x``: a column slice of the fused output, computed once per input
        tensor for all parts. Under torch.compile there is no cache (the traced graph holds one fused call
        per slice, which the compiler may merge)."""
        start = sum(self.part_sizes[:index])
        stop = start + self.part_sizes[index]
        if torch.compiler.is_compiling():
            return self(x)[..., start:stop]
        version = _version(x)
        cache = self._cache
        if cache is None or cache[0] is not x or cache[1] != version or index in cache[3]:
            cache = self._cache = [x, version, self(x), set()]
        cache[3].add(index)
        out = cache[2][..., start:stop]
        if len(cache[3]) == len(self.part_sizes):
            self._cache = None  # every part served: drop the references to the input and output
        return out


class FusedTrellisLinear(_Parts, TrellisLinear):
    """Several :class:`TrellisLinear` layers on one input as one: their row tiles, scales, biases and low-rank
    terms stacked along the output rows (module docstring), so one decode kernel launch serves all of them."""

    def __init__(self, layers: Sequence[TrellisLinear]) -> None:
        f0 = self._take_parts(layers)
        fmt = dataclasses.replace(
            f0, out_features=sum(self.part_sizes), bias=any(layer.bias is not None for layer in layers)
        )
        super().__init__(fmt, dtype=layers[0].scales.dtype, device=layers[0].codes.device)
        col_blocks = f0.in_features // f0.tile_cols
        # tile (b, r) is row r of column block b, at index b * row_tiles + r: stack each column block's row tiles
        per_block = [layer.codes.reshape(col_blocks, -1, f0.symbols_per_tile) for layer in layers]
        self.codes.copy_(torch.cat(per_block, dim=1).reshape(fmt.num_tiles, f0.symbols_per_tile))
        self.scales.data.copy_(torch.cat([layer.scales.data for layer in layers]))
        self.bias = _stacked_bias(layers, self.scales.data.flatten())
        self.part_ranks = [layer.rank for layer in layers]
        self.part_slots = _slot_formats(layers)
        self.low_rank_a, self.low_rank_b = _stacked_low_rank(layers, fmt.out_features)
        self.use_kernels = all(layer.use_kernels for layer in layers)
        self._cache = None

    def unfuse(self) -> list[TrellisLinear]:
        """The original layers, rebuilt from the fused tensors (exact copies)."""
        f = self.fmt
        col_blocks = f.in_features // f.tile_cols
        tiles = self.codes.reshape(col_blocks, -1, f.symbols_per_tile)
        row_tiles = [n // f.tile_rows for n in self.part_sizes]
        starts = [sum(self.part_sizes[:i]) for i in range(len(self.part_sizes))]
        layers = []
        for p, (fmt, codes) in enumerate(zip(self.part_formats, torch.split(tiles, row_tiles, dim=1), strict=True)):
            layer = TrellisLinear(fmt, dtype=self.scales.dtype, device=self.codes.device)
            layer.codes.copy_(codes.reshape(fmt.num_tiles, f.symbols_per_tile))
            rows = slice(starts[p], starts[p] + fmt.out_features)
            layer.scales.data.copy_(self.scales.data[rows])
            if fmt.bias:
                layer.bias.data.copy_(self.bias.data[rows])
            _restore_low_rank(layer, self, p)
            layer.use_kernels = self.use_kernels
            layers.append(layer)
        return layers

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, parts={self.part_sizes}, ranks={self.part_ranks}"


class FusedCodebookLinear(_Parts, nn.Module):
    """Several :class:`CodebookLinear` layers on one input as one layer: ``forward(x)`` is the concatenation
    of their outputs along the last dimension, computed by one kernel launch on a GPU."""

    def __init__(self, layers: Sequence[CodebookLinear]) -> None:
        super().__init__()
        f0 = self._take_parts(layers)
        self.fmt = CodebookFormat(
            in_features=f0.in_features,
            out_features=sum(self.part_sizes),
            in_group_size=f0.in_group_size,
            out_group_size=f0.out_group_size,
            num_codebooks=f0.num_codebooks,
            nbits_per_codebook=f0.nbits_per_codebook,
            bias=any(layer.bias is not None for layer in layers),
        )
        self.in_features, self.out_features = self.fmt.in_features, self.fmt.out_features
        self.register_buffer("codes", torch.cat([layer.codes for layer in layers]))
        self.codebooks = nn.Parameter(torch.stack([layer.codebooks.data for layer in layers]), requires_grad=False)
        self.scales = nn.Parameter(torch.cat([layer.scales.data for layer in layers]), requires_grad=False)
        self.bias = _stacked_bias(layers, self.scales.data.flatten())
        self.part_ranks = [layer.rank for layer in layers]
        self.part_slots = _slot_formats(layers)
        self.low_rank_a, self.low_rank_b = _stacked_low_rank(layers, self.out_features)
        self.use_kernels = all(layer.use_kernels for layer in layers)
        self._cache: list | None = None  # [input, its version, fused output, slice indices served]

    def _out_group_rows(self) -> list[int]:
        return [n // self.fmt.out_group_size for n in self.part_sizes]

    def _codebook_weight(self) -> torch.Tensor:
        nbits = self.fmt.nbits_per_codebook
        codes = torch.split(self.codes, self._out_group_rows())
        scales = torch.split(self.scales, self._out_group_rows())
        parts = enumerate(zip(codes, scales, strict=True))
        return torch.cat([dequantize_weight(c, self.codebooks[p], s, nbits) for p, (c, s) in parts])

    def dequantize(self) -> torch.Tensor:
        """Dense ``[sum N_p, K]`` weight: the parts' weights stacked (low-rank terms included)."""
        w = self._codebook_weight()
        if self.low_rank_a is not None:
            w = w + self.low_rank_b @ self.low_rank_a
        return w

    def _kernel(self, x: torch.Tensor) -> torch.Tensor | None:
        if not self.use_kernels or x.device.type not in ("cuda", "cpu"):
            return None
        if torch.is_grad_enabled() and (self.codebooks.requires_grad or self.scales.requires_grad):
            return None
        from lit_cb.kernels import dispatch

        if not dispatch.supports(self.fmt, x):
            return None
        from lit_cb.kernels import ops  # noqa: F401  registers torch.ops.lit_cb.codebook_linear_fused

        algo = dispatch.choose_algo(self.fmt, x.numel() // max(1, x.shape[-1]))
        return torch.ops.lit_cb.codebook_linear_fused(
            x, self.codes, self.codebooks, self.scales, self.bias, self.fmt.nbits_per_codebook, algo, self.part_sizes
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._kernel(x)
        if out is None:
            w = self._codebook_weight()
            out = F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if self.low_rank_a is not None:
            out = out + F.linear(F.linear(x, self.low_rank_a.to(x.dtype)), self.low_rank_b.to(x.dtype))
        return out

    def unfuse(self) -> list[CodebookLinear]:
        """The original layers, rebuilt from the fused tensors (exact copies)."""
        layers = []
        rows = self._out_group_rows()
        codes = torch.split(self.codes, rows)
        scales = torch.split(self.scales, rows)
        starts = [sum(self.part_sizes[:i]) for i in range(len(self.part_sizes))]
        for p, fmt in enumerate(self.part_formats):
            layer = CodebookLinear(fmt, dtype=self.codebooks.dtype, device=self.codebooks.device)
            layer.codes.copy_(codes[p])
            layer.codebooks.data.copy_(self.codebooks.data[p])
            layer.scales.data.copy_(scales[p])
            if fmt.bias:
                layer.bias.data.copy_(self.bias.data[starts[p] : starts[p] + fmt.out_features])
            _restore_low_rank(layer, self, p)
            layer.use_kernels = self.use_kernels
            layers.append(layer)
        return layers

    def extra_repr(self) -> str:
        f = self.fmt
        return (
            f"in={f.in_features}, parts={self.part_sizes}, {f.num_codebooks}x{f.nbits_per_codebook} "
            f"g{f.in_group_size}, ranks={self.part_ranks}"
        )


def _version(x: torch.Tensor) -> int:
    """The in-place version counter (inference tensors have none: -1; they cannot be modified in place
    outside inference mode, and the identity check still holds)."""
    try:
        return x._version
    except RuntimeError:
        return -1


class FusedSlice(nn.Module):
    """Stands in for one fused layer under its old name: returns that layer's columns of the fused output.
    Holds the fused layer without registering it (the parent does), so it is saved and moved once."""

    def __init__(self, fused: FusedCodebookLinear | FusedTrellisLinear, index: int, fused_name: str) -> None:
        super().__init__()
        object.__setattr__(self, "fused", fused)
        self.index = index
        self.fused_name = fused_name
        self.in_features = fused.in_features
        self.out_features = fused.part_sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.part(x, self.index)

    def extra_repr(self) -> str:
        return f"part {self.index} of {self.fused_name}, out={self.out_features}"


def fused_name(names: Sequence[str]) -> str:
    return "fused_" + "_".join(names)


def fuse_projections(model: nn.Module, groups: Sequence[Sequence[str]] = DEFAULT_GROUPS) -> int:
    """Fuse, in every submodule, each group of sibling CodebookLinears or TrellisLinears named in ``groups`` that
    share a format (all but out_features and bias); returns the number of groups fused. Groups whose layers are
    missing, wrapped (peft LoRA), of different types or of different formats are left as they are."""
    for names in groups:
        if not 2 <= len(names) <= MAX_PARTS:
            raise ValueError(f"fusion group {tuple(names)} must name 2 to {MAX_PARTS} sibling layers")
    count = 0
    for parent in list(model.modules()):
        for names in groups:
            layers = [getattr(parent, name, None) for name in names]
            if not all(type(layer) in (CodebookLinear, TrellisLinear) for layer in layers) or _shared_format(layers):
                continue
            fused = (FusedTrellisLinear if type(layers[0]) is TrellisLinear else FusedCodebookLinear)(layers)
            name = fused_name(names)
            setattr(parent, name, fused)
            for index, part_name in enumerate(names):
                setattr(parent, part_name, FusedSlice(fused, index, name))
            count += 1
    return count


def unfuse_projections(model: nn.Module) -> int:
    """Undo :func:`fuse_projections`: the original layers back under their names (for saving, LoRA or training);
    returns the number of groups restored."""
    count = 0
    for parent in list(model.modules()):
        slices = {name: child for name, child in parent.named_children() if isinstance(child, FusedSlice)}
        by_fused: dict[str, list[tuple[int, str]]] = {}
        for name, child in slices.items():
            by_fused.setdefault(child.fused_name, []).append((child.index, name))
        for fname, parts in by_fused.items():
            fused = getattr(parent, fname)
            for (_, name), layer in zip(sorted(parts), fused.unfuse(), strict=True):
                setattr(parent, name, layer)
            delattr(parent, fname)
            count += 1
    return count
