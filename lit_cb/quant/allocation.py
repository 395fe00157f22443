"""Mixed precision under an average-bits budget: pick one option per layer (pure, no torch).

Each compressed linear ``i`` has candidate options ``j`` (method_config overrides, e.g. nbits 7..10),
each with an exact storage cost ``c_ij`` in bits (from ``CodebookFormat.storage_bits``, the one
counting function behind ``bits_per_weight``) and a measured, sensitivity-weighted error ``e_ij``.
The allocation solves the multiple-choice knapsack

    minimise  sum_i e_i,j(i)   subject to   sum_i c_i,j(i) <= floor(budget * total_weights)

Why a dynamic programme and not only a Lagrangian sweep: the sweep (each layer picks
``argmin_j e_ij + lambda c_ij``) only reaches allocations on the lower convex hull of each layer's
(cost, error) curve and can leave a large part of the budget unused when layers are few and the
bit steps big (a 7B model has ~224 linears, each step moves ~0.5% of the budget). The DP over the
extra cost above each layer's cheapest option is exact when its unit is the gcd of all the extra
costs (true for realistic ladders: every cost step is a multiple of out*in/g bits and 16-bit
codebook rows); when that would need more than ``max_states`` states, costs are rounded *up* to a
coarser unit (so the result always fits the budget) and a greedy pass then spends the bits the
rounding left, with exact costs. The Lagrangian dual is still computed: it is a lower bound on
the optimal error, reported so a non-exact allocation states how far from optimal it can be.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from fractions import Fraction

import numpy as np

MAX_STATES = 1 << 17  # DP columns; L x MAX_STATES int16 choices (224 layers: 59 MB) at most


@dataclass(frozen=True)
class LayerChoices:
    """One layer's candidates: exact bits and (weighted) error of each option, in option order."""

    name: str
    numel: int
    costs: tuple[int, ...]
    errors: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.costs or len(self.costs) != len(self.errors):
            raise ValueError(f"layer {self.name}: needs as many costs as errors, at least one ({self.costs})")
        if any(not isinstance(c, int) or c < 0 for c in self.costs):
            raise ValueError(f"layer {self.name}: costs must be integer bits >= 0, got {self.costs}")
        if any(not math.isfinite(e) or e < 0 for e in self.errors):
            raise ValueError(f"layer {self.name}: errors must be finite and >= 0, got {self.errors}")


@dataclass
class Allocation:
    """The chosen option of every layer and what it costs.

    ``status``: "optimal" (DP at the exact gcd unit), "near-optimal" (coarse DP + greedy fill;
    ``lower_bound`` bounds the gap) or "unconstrained" (every layer's lowest-error option fits)."""

    choice: dict[str, int]
    total_bits: int
    budget_bits: int
    total_weights: int
    error: float
    lower_bound: float
    status: str
    unit_bits: int = 0
    per_layer: dict[str, dict] = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        return self.total_bits / self.total_weights

    def to_dict(self) -> dict:
        return {**asdict(self), "bits_per_weight": self.bits_per_weight}


def budget_bits(budget: float, total_weights: int) -> int:
    """The largest integer number of bits whose average over ``total_weights`` is <= ``budget``
    (exact rational arithmetic: ``floor(budget * n)``, never a float rounding up)."""
    return math.floor(Fraction(budget) * total_weights)


def _pareto(costs: tuple[int, ...], errors: tuple[float, ...]) -> list[int]:
    """Indices of the options not dominated by a cheaper-or-equal, no-worse one, by cost."""
    order = sorted(range(len(costs)), key=lambda j: (costs[j], errors[j], j))
    keep: list[int] = []
    best = math.inf
    for j in order:
        if errors[j] < best:
            keep.append(j)
            best = errors[j]
    return keep


def lagrangian_lower_bound(layers: list[LayerChoices], budget: int, iters: int = 200) -> float:
    """``max_lambda>=0 sum_i min_j (e_ij + lambda c_ij) - lambda * budget`` (weak duality: <= the
    optimum of the knapsack). Concave in lambda; maximised by bisection on its supergradient."""
    costs = [np.asarray(lay.costs, dtype=np.float64) for lay in layers]
    errors = [np.asarray(lay.errors, dtype=np.float64) for lay in layers]

    def value_and_slope(lam: float) -> tuple[float, float]:
        val, used = -lam * budget, 0.0
        for c, e in zip(costs, errors, strict=True):
            j = int(np.argmin(e + lam * c))
            val += e[j] + lam * c[j]
            used += c[j]
        return val, used - budget

    lo, hi = 0.0, 1.0
    if value_and_slope(0.0)[1] <= 0:
        return value_and_slope(0.0)[0]
    while value_and_slope(hi)[1] > 0 and hi < 1e300:
        hi *= 2.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if value_and_slope(mid)[1] > 0:
            lo = mid
        else:
            hi = mid
    return max(value_and_slope(lo)[0], value_and_slope(hi)[0])


def allocate(layers: list[LayerChoices], budget: float, max_states: int = MAX_STATES) -> Allocation:
    """The option of each layer minimising the summed error with average bits <= ``budget``.

    Raises ValueError when even the cheapest option of every layer exceeds the budget. When every
    layer's lowest-error option fits, that is the answer (status "unconstrained")."""
    if not layers:
        raise ValueError("no layers to allocate bits to")
    names = [lay.name for lay in layers]
    if len(set(names)) != len(names):
        raise ValueError("layer names must be unique")
    if not (isinstance(budget, int | float) and math.isfinite(budget) and budget > 0):
        raise ValueError(f"budget={budget!r} must be a finite number of bits per weight > 0")
    total_weights = sum(lay.numel for lay in layers)
    cap = budget_bits(budget, total_weights)
    cheapest = sum(min(lay.costs) for lay in layers)
    if cheapest > cap:
        raise ValueError(
            f"bit budget {budget} bits/weight is below the cheapest allocation: every layer at its cheapest "
            f"option needs {cheapest / total_weights:.4f} bits/weight over {total_weights} weights; raise the "
            "budget or add cheaper options"
        )
    bound = lagrangian_lower_bound(layers, cap)
    best_err = [min(range(len(lay.costs)), key=lambda j, lay=lay: (lay.errors[j], lay.costs[j])) for lay in layers]
    if sum(lay.costs[j] for lay, j in zip(layers, best_err, strict=True)) <= cap:
        return _result(layers, best_err, cap, total_weights, bound, "unconstrained", 0)

    # DP over the extra bits above each layer's cheapest option, on its Pareto options only.
    fronts = [_pareto(lay.costs, lay.errors) for lay in layers]
    base = [lay.costs[f[0]] for lay, f in zip(layers, fronts, strict=True)]
    extra = [[lay.costs[j] - b for j in f] for lay, f, b in zip(layers, fronts, base, strict=True)]
    room = cap - sum(base)
    steps = [d for ds in extra for d in ds if d > 0]
    unit = math.gcd(*steps) if steps else 1
    exact = room // unit <= max_states
    if not exact:
        unit = -(-room // max_states)
    states = room // unit
    best = np.zeros(states + 1)  # best[r]: least error of the layers so far using <= r units
    choices = np.zeros((len(layers), states + 1), dtype=np.int16)
    for i, (lay, f, ds) in enumerate(zip(layers, fronts, extra, strict=True)):
        new = np.full(states + 1, np.inf)
        for k, (j, d) in enumerate(zip(f, ds, strict=True)):
            u = -(-d // unit)  # rounded up: a coarse unit never lets the true cost exceed the budget
            if u > states:
                continue
            cand = np.full(states + 1, np.inf)
            cand[u:] = best[: states + 1 - u] + lay.errors[j]
            better = cand < new
            new[better] = cand[better]
            choices[i, better] = k
        best = new
    pick = [0] * len(layers)
    r = states
    for i in range(len(layers) - 1, -1, -1):
        k = int(choices[i, r])
        pick[i] = fronts[i][k]
        r -= -(-extra[i][k] // unit)
    if not exact:
        pick = _greedy_fill(layers, pick, cap)
    return _result(layers, pick, cap, total_weights, bound, "optimal" if exact else "near-optimal", unit)


def _greedy_fill(layers: list[LayerChoices], pick: list[int], cap: int) -> list[int]:
    """Spend what the rounded-up DP left: repeatedly take the single-layer option change that
    lowers the error most among those that still fit (exact costs)."""
    pick = list(pick)
    used = sum(lay.costs[j] for lay, j in zip(layers, pick, strict=True))
    while True:
        best_gain, move = 0.0, None
        for i, lay in enumerate(layers):
            cur = pick[i]
            for j in range(len(lay.costs)):
                gain = lay.errors[cur] - lay.errors[j]
                if gain > best_gain and used - lay.costs[cur] + lay.costs[j] <= cap:
                    best_gain, move = gain, (i, j)
        if move is None:
            return pick
        i, j = move
        used += layers[i].costs[j] - layers[i].costs[pick[i]]
        pick[i] = j


def _result(
    layers: list[LayerChoices], pick: list[int], cap: int, total_weights: int, bound: float, status: str, unit: int
) -> Allocation:
    total = sum(lay.costs[j] for lay, j in zip(layers, pick, strict=True))
    if total > cap:  # the DP and the fill guarantee this; a bug must not pass silently
        raise AssertionError(f"allocation uses {total} bits > budget {cap}")
    return Allocation(
        choice={lay.name: j for lay, j in zip(layers, pick, strict=True)},
        total_bits=total,
        budget_bits=cap,
        total_weights=total_weights,
        error=float(sum(lay.errors[j] for lay, j in zip(layers, pick, strict=True))),
        lower_bound=float(bound),
        status=status,
        unit_bits=unit,
        per_layer={
            lay.name: {"option": j, "bits": lay.costs[j], "bits_per_weight": lay.costs[j] / lay.numel}
            for lay, j in zip(layers, pick, strict=True)
        },
    )
