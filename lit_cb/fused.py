"""Inference-time fusion of sibling :class:`~lit_cb.layers.CodebookLinear` layers that read one input
(q/k/v, gate/up) into one layer with one kernel launch.

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
:func:`unfuse_codebook_projections` restores exactly (codes, codebooks, scales, bias, low-rank terms).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lit_cb.layers import CodebookFormat, CodebookLinear, dequantize_weight

# sibling projections that read the same input, in the layouts lit_cb compresses (Llama-style HF models)
DEFAULT_GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
MAX_PARTS = 4  # what the kernels take (lit_cb.kernels.codebook.MAX_PARTS)


def _shared_format(layers: Sequence[CodebookLinear]) -> str | None:
    """Why these layers cannot be fused, or None when they can."""
    if not 2 <= len(layers) <= MAX_PARTS:
        return f"{len(layers)} layers; fusion takes 2 to {MAX_PARTS}"
    first = layers[0]
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


class FusedCodebookLinear(nn.Module):
    """Several :class:`CodebookLinear` layers on one input as one layer: ``forward(x)`` is the concatenation
    of their outputs along the last dimension, computed by one kernel launch on a GPU."""

    def __init__(self, layers: Sequence[CodebookLinear]) -> None:
        super().__init__()
        reason = _shared_format(layers)
        if reason is not None:
            raise ValueError(f"cannot fuse these layers: {reason}")
        f0 = layers[0].fmt
        self.part_sizes = [layer.out_features for layer in layers]
        self.part_formats = [layer.fmt for layer in layers]
        has_bias = any(layer.bias is not None for layer in layers)
        self.fmt = CodebookFormat(
            in_features=f0.in_features,
            out_features=sum(self.part_sizes),
            in_group_size=f0.in_group_size,
            out_group_size=f0.out_group_size,
            num_codebooks=f0.num_codebooks,
            nbits_per_codebook=f0.nbits_per_codebook,
            bias=has_bias,
        )
        self.in_features, self.out_features = self.fmt.in_features, self.fmt.out_features
        self.register_buffer("codes", torch.cat([layer.codes for layer in layers]))
        self.codebooks = nn.Parameter(torch.stack([layer.codebooks.data for layer in layers]), requires_grad=False)
        self.scales = nn.Parameter(torch.cat([layer.scales.data for layer in layers]), requires_grad=False)
        self.bias = None
        if has_bias:
            parts = [
                layer.bias.data if layer.bias is not None else layer.scales.new_zeros(layer.out_features)
                for layer in layers
            ]
            self.bias = nn.Parameter(torch.cat(parts), requires_grad=False)
        # low-rank terms: A stacked [sum r, in], B block-diagonal [out, sum r], so one pair of matmuls
        # gives every part its own correction
        self.low_rank_a = self.low_rank_b = None
        self.part_ranks = [layer.rank for layer in layers]
        if any(self.part_ranks):
            ref = layers[0].codebooks
            a = torch.cat([layer.low_rank_a.data for layer in layers if layer.rank])
            b = ref.new_zeros(self.out_features, a.shape[0])
            row = col = 0
            for layer in layers:
                if layer.rank:
                    b[row : row + layer.out_features, col : col + layer.rank] = layer.low_rank_b.data
                    col += layer.rank
                row += layer.out_features
            self.low_rank_a = nn.Parameter(a, requires_grad=False)
            self.low_rank_b = nn.Parameter(b, requires_grad=False)
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

    def unfuse(self) -> list[CodebookLinear]:
        """The original layers, rebuilt from the fused tensors (exact copies)."""
        layers = []
        rows = self._out_group_rows()
        codes = torch.split(self.codes, rows)
        scales = torch.split(self.scales, rows)
        starts = [sum(self.part_sizes[:i]) for i in range(len(self.part_sizes))]
        col = 0
        for p, fmt in enumerate(self.part_formats):
            layer = CodebookLinear(fmt, dtype=self.codebooks.dtype, device=self.codebooks.device)
            layer.codes.copy_(codes[p])
            layer.codebooks.data.copy_(self.codebooks.data[p])
            layer.scales.data.copy_(scales[p])
            if fmt.bias:
                layer.bias.data.copy_(self.bias.data[starts[p] : starts[p] + fmt.out_features])
            rank = self.part_ranks[p]
            if rank:
                rows_p = slice(starts[p], starts[p] + fmt.out_features)
                layer.low_rank_a = nn.Parameter(self.low_rank_a.data[col : col + rank].clone(), requires_grad=False)
                layer.low_rank_b = nn.Parameter(
                    self.low_rank_b.data[rows_p, col : col + rank].clone(), requires_grad=False
                )
                col += rank
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

    def __init__(self, fused: FusedCodebookLinear, index: int, fused_name: str) -> None:
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


def fuse_codebook_projections(model: nn.Module, groups: Sequence[Sequence[str]] = DEFAULT_GROUPS) -> int:
    """Fuse, in every submodule, each group of sibling CodebookLinears named in ``groups`` that share a
    format (all but out_features and bias); returns the number of groups fused. Groups whose layers are
    missing, wrapped (peft LoRA) or of different formats are left as they are."""
    for names in groups:
        if not 2 <= len(names) <= MAX_PARTS:
            raise ValueError(f"fusion group {tuple(names)} must name 2 to {MAX_PARTS} sibling layers")
    count = 0
    for parent in list(model.modules()):
        for names in groups:
            layers = [getattr(parent, name, None) for name in names]
            if not all(isinstance(layer, CodebookLinear) for layer in layers) or _shared_format(layers):
                continue
            fused = FusedCodebookLinear(layers)
            name = fused_name(names)
            setattr(parent, name, fused)
            for index, part_name in enumerate(names):
                setattr(parent, part_name, FusedSlice(fused, index, name))
            count += 1
    return count


def unfuse_codebook_projections(model: nn.Module) -> int:
    """Undo :func:`fuse_codebook_projections`: the original CodebookLinears back under their names (for
    saving, LoRA or training); returns the number of groups restored."""
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
