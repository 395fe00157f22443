"""torch.distributed helpers for compression: who this rank is, collectives that also work for the
dtypes gloo lacks, and the deterministic choices every rank must make alike.

Everything here is a no-op outside an initialised process group of more than one rank, so the
single-process path runs exactly the code it always ran. Collectives are called in the same order
on every rank; any decision that steers control flow (which rank owns a layer, which layers stay
dense, when block fine-tuning stops) is computed from values that are bit-identical on all ranks,
otherwise ranks would take different branches and hang in the next collective.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

# gloo broadcasts/reduces these dtypes; anything else (int16 AQLM 1x16 codes) travels as bytes.
_GLOO_DTYPES = {
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.uint8,
    torch.int8,
    torch.int32,
    torch.int64,
    torch.bool,
}


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_tensor(tensor: torch.Tensor, src: int) -> None:
    """In-place broadcast of ``tensor`` from ``src``; dtypes gloo cannot carry go as raw bytes
    (a byte view of the same storage, so the receiver's tensor is filled in place)."""
    if not is_distributed():
        return
    if tensor.dtype in _GLOO_DTYPES:
        dist.broadcast(tensor, src=src)
        return
    if not tensor.is_contiguous():
        raise ValueError(f"cannot broadcast a non-contiguous {tensor.dtype} tensor as bytes")
    dist.broadcast(tensor.view(torch.uint8), src=src)


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Every parameter and buffer of ``module`` (floating or not) from ``src`` to all ranks."""
    if not is_distributed():
        return
    seen: set[int] = set()
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        broadcast_tensor(t.data, src)


def broadcast_object(obj: Any, src: int) -> Any:
    """A picklable object from ``src`` (what every rank returns)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum_(tensors: Sequence[torch.Tensor]) -> None:
    """Sum each tensor over ranks in place, with one collective: the tensors (all of one dtype
    and device) are packed into one flat buffer and unpacked afterwards."""
    if not is_distributed() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def check_same_on_all_ranks(value: Any, what: str) -> None:
    """Raise on every rank (never on some: the others would hang) if ``value`` differs across ranks."""
    if not is_distributed():
        return
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        raise RuntimeError(f"{what} differs across ranks: {values}")


def assign_owners(costs: dict[str, float], num_ranks: int) -> dict[str, int]:
    """Which rank compresses which layer: greedy longest-processing-time first (largest cost to
    the least loaded rank; ties by name and by lowest rank), identical on every rank because it
    depends only on the names and costs."""
    load = [0.0] * num_ranks
    owners: dict[str, int] = {}
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        r = min(range(num_ranks), key=lambda i: (load[i], i))
        owners[name] = r
        load[r] += costs[name]
    return owners


def layer_seed(name: str, run_seed: int) -> int:
    """A 63-bit seed from a layer's full name and the run seed: the random state a layer is
    compressed with, whichever rank compresses it (sha256, so it does not vary with Python's
    per-process string hashing)."""
    digest = hashlib.sha256(f"{run_seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
