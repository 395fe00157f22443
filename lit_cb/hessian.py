"""Input second moments H = XᵀX of linear layers: what every Hessian-aware method consumes.

For a linear layer y = xWᵀ and the layer objective ||XWᵀ - XŴᵀ||², the Hessian with respect to
each weight row is 2XᵀX, so H (with its token count) is all a method needs to know about the
data. :class:`HessianAccumulator` holds one H; :func:`attach_hessian_hooks` fills accumulators
from forward hooks (no gradients); :class:`HessianCallback` does that during a Lightning
validation/predict epoch and all-reduces across ranks.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

HESSIAN_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class HessianAccumulator:
    """Running sum of xᵀx over the tokens seen, and how many tokens that was."""

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float32, device=None) -> None:
        if dtype not in HESSIAN_DTYPES.values():
            raise ValueError(f"hessian dtype {dtype} is not allowed; use float32 or float64")
        self.sum = torch.zeros(in_features, in_features, dtype=dtype, device=device)  # [in, in]
        self.num_tokens = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Add the tokens of ``x`` ``[..., in_features]``."""
        x = x.reshape(-1, x.shape[-1]).to(self.sum.device, self.sum.dtype)
        self.sum.addmm_(x.T, x)
        self.num_tokens += x.shape[0]

    def all_reduce(self) -> None:
        """Sum over ranks (no-op outside torch.distributed), so every rank holds the global H."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            count = torch.tensor([float(self.num_tokens)], device=self.sum.device, dtype=torch.float64)
            dist.all_reduce(self.sum)
            dist.all_reduce(count)
            self.num_tokens = int(count.item())

    @property
    def hessian(self) -> torch.Tensor:
        """Mean second moment XᵀX / n_tokens (float32)."""
        if self.num_tokens == 0:
            raise RuntimeError("no tokens were accumulated: the layer was never called")
        return (self.sum / self.num_tokens).float()

    def state_dict(self) -> dict:
        return {"sum": self.sum, "num_tokens": self.num_tokens}

    def load_state_dict(self, state: dict) -> None:
        self.sum.copy_(state["sum"])
        self.num_tokens = int(state["num_tokens"])


def attach_hessian_hooks(
    modules: dict[str, nn.Linear], dtype: torch.dtype = torch.float32, device=None
) -> tuple[dict[str, HessianAccumulator], list[torch.utils.hooks.RemovableHandle]]:
    """Accumulate H for each named linear from its inputs.

    Linears fed by the very same input tensor (q/k/v, gate/up) share one accumulator, so the
    product is computed once. The returned dict fills in as the modules are called; remove the
    handles when done.
    """
    accumulators: dict[str, HessianAccumulator] = {}
    last_input: dict[int, weakref.ref] = {}  # id(accumulator) -> the tensor it added last

    def make_hook(name: str, module: nn.Linear) -> Callable:
        def hook(_mod: nn.Module, args: tuple) -> None:
            x = args[0]
            acc = accumulators.get(name)
            if acc is None:
                sibling = next(
                    (a for a in accumulators.values() if (r := last_input.get(id(a))) is not None and r() is x),
                    None,
                )
                acc = sibling or HessianAccumulator(
                    module.in_features, dtype, device if device is not None else x.device
                )
                accumulators[name] = acc
            ref = last_input.get(id(acc))
            if ref is not None and ref() is x:
                return  # a sibling already added this very tensor
            acc.add(x)
            last_input[id(acc)] = weakref.ref(x)

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n, m)) for n, m in modules.items()]
    return accumulators, handles


def remove_hooks(handles: Iterable[torch.utils.hooks.RemovableHandle]) -> None:
    for h in handles:
        h.remove()


class HessianCallback(L.Callback):
    """Collect H for selected linears during a validation or predict epoch.

    Usage: ``trainer.validate(module, dataloader)`` with this callback; afterwards
    ``callback.hessians[name]`` holds the global (all-reduced) mean XᵀX of each layer. Used for
    salience scoring and by users who want Hessians of the float model.
    """

    def __init__(self, select: Callable[[str, nn.Module], bool] | None = None, dtype: str = "float32") -> None:
        super().__init__()
        if dtype not in HESSIAN_DTYPES:
            raise ValueError(f"HessianCallback dtype={dtype!r}; allowed: {sorted(HESSIAN_DTYPES)}")
        self.select = select or (lambda name, m: isinstance(m, nn.Linear) and "lm_head" not in name)
        self.dtype = HESSIAN_DTYPES[dtype]
        self.accumulators: dict[str, HessianAccumulator] = {}
        self._handles: list = []

    def _start(self, pl_module: L.LightningModule) -> None:
        targets = {n: m for n, m in pl_module.named_modules() if isinstance(m, nn.Linear) and self.select(n, m)}
        if not targets:
            raise ValueError("HessianCallback selected no nn.Linear modules")
        self.accumulators, self._handles = attach_hessian_hooks(targets, self.dtype)

    def _finish(self) -> None:
        remove_hooks(self._handles)
        self._handles = []
        for acc in {id(a): a for a in self.accumulators.values()}.values():
            acc.all_reduce()
        rank_zero_info(f"HessianCallback: collected H for {len(self.accumulators)} linears")

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish()

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(pl_module)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish()

    @property
    def hessians(self) -> dict[str, torch.Tensor]:
        return {name: acc.hessian for name, acc in self.accumulators.items()}
