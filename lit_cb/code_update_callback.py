"""Discrete code updates during recovery (PV-tuning's linearized V-step), as a Lightning callback.

:class:`RecoveryModule` adds :class:`CodeUpdateCallback` through ``configure_callbacks`` when
``recovery.code_update_every > 0``, so it runs in any Trainer that fits the module. Every
``code_update_every`` optimizer steps, on that step only:

1. hooks on every :class:`~lit_cb.layers.CodebookLinear` (the base layer inside peft's
   ``CodebookLoraLinear`` too) record ``G = grad_outᵀ x`` (the gradient of the loss with respect
   to the layer's dequantized weight) and ``sum x²`` per input column over the step's tokens
   (every micro-batch of a gradient accumulation). Hooks see the layer's input and output, so
   this is the same whether the forward runs the Triton kernel or the dequantize path. A layer
   whose input needs no gradient (nothing trainable upstream) gets a detached copy that does,
   so its output gradient is computed on this step;
2. in ``on_before_optimizer_step`` (after the step's last backward, before the optimizer and
   before the step's checkpoint) the running mean ``d`` of x² is updated and
   :func:`lit_cb.quant.code_update.linearized_v_step` re-assigns the selected groups' codes;
3. **the update is kept only if it lowers the training loss on the step's own batches** (evaluated
   without dropout, at the training precision, before and after; summed over ranks). Otherwise
   the codes are put back and the update is retried at half the step, up to ``backtracks`` times;
   an update that never lowers the loss is dropped.

Why the guard: the V-step minimises a *diagonal* quadratic model of the loss, which ignores how
errors in one layer's weights interact with every other layer. On the H200 (SmolLM2-135M, codebook
g4 B8, 1% of groups, step 0.5) the first update re-assigned 237k of the 265k selected groups and
took the training KL from 0.94 to 11.9 nats, i.e. destroyed the model, although every group's
objective fell. The check costs ``1 + attempts`` student forward passes without gradient per update
(every ``every`` steps) and, when distilling, one teacher forward per micro-batch (its logits are
kept for the attempts), and it makes an update unable to raise the loss it is meant to lower.

On other steps the hooks return at once: no cost. ``d`` is a running mean over the tokens of
every code-update step so far (a diagonal estimate needs few tokens; collecting it only on those
steps keeps the other steps free and leaves no half-collected state at a checkpoint).

**Resume.** Codes are buffers, so every checkpoint carries the updated codes; the callback's
state (the running sums of x² and token counts) is checkpointed too, and the schedule follows
``trainer.global_step``, which Lightning restores. No randomness is used. A resumed run therefore
repeats the uninterrupted one exactly (bit-identical on CPU, tested).

**DDP.** G, the x² sums and the token counts are all-reduced (summed) before the assignment, so
every rank computes the update from the same global statistics and gets the same result; as a
guard against ranks whose kernels round differently, rank 0's selected groups and their new codes
are then broadcast and written on every rank, so the codes (kept out of DDP's buffer sync, see
``RecoveryModule._ignore_codes_in_ddp``) stay bit-identical across ranks.

Cost per call: one ``[out, in]`` fp32 gradient per layer held from the step's backward until its
optimizer step (the dense model's size in fp32: 0.4 GB for SmolLM2-135M, 26 GB for a 7B model;
``recovery.code_update_offload`` keeps it in CPU memory instead, one layer on the device at a
time), one ``[tokens, out] x [tokens, in]`` matmul per layer (as much as the backward's weight
gradient), and the assignment of ``fraction`` of the groups.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lit_cb import distributed as dist_utils
from lit_cb.layers import CodebookLinear, pack_codes, unpack_codes
from lit_cb.quant.code_update import CodeUpdateStats, linearized_v_step


class _LayerHooks:
    """Forward hooks on one CodebookLinear that, while ``active``, accumulate ``G`` and ``sum x²``."""

    def __init__(self, layer: CodebookLinear, offload: bool = False) -> None:
        self.layer = layer
        self.active = False
        self.offload = offload
        self.grad: torch.Tensor | None = None  # [out, in] float32 (in CPU memory when offloading)
        self.sq_sum: torch.Tensor | None = None  # [in] float64
        self.tokens = 0
        self._handles = [
            layer.register_forward_pre_hook(self._pre_hook),
            layer.register_forward_hook(self._post_hook),
        ]

    def _pre_hook(self, module: nn.Module, args: tuple):
        if not self.active or not torch.is_grad_enabled():
            return None
        x = args[0]
        flat = x.detach().reshape(-1, x.shape[-1])
        sq = flat.float().square().sum(0).double()
        self.sq_sum = sq if self.sq_sum is None else self.sq_sum + sq
        self.tokens += flat.shape[0]
        if not x.requires_grad:
            # Nothing upstream trains: give the layer an input that needs a gradient, so that
            # autograd computes this layer's output gradient (the graph still ends here).
            return (x.detach().requires_grad_(True), *args[1:])
        return None

    def _post_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if not self.active or not torch.is_grad_enabled() or not output.requires_grad:
            return
        x = args[0]

        def on_grad(grad_out: torch.Tensor) -> None:
            g = grad_out.reshape(-1, grad_out.shape[-1]).float().T @ x.detach().reshape(-1, x.shape[-1]).float()
            if self.offload and g.device.type != "cpu":
                g = g.to("cpu")  # one layer's G on the device at a time, not the whole model's
            self.grad = g if self.grad is None else self.grad.add_(g)

        output.register_hook(on_grad)

    def reset(self) -> None:
        self.grad, self.sq_sum, self.tokens = None, None, 0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class CodeUpdateCallback(L.Callback):
    """Re-assign the codes of every CodebookLinear of ``pl_module.model`` every ``every`` steps.

    Args:
        every: optimizer steps between code updates (>= 1).
        fraction: share of each layer's groups re-assigned per update, in (0, 1].
        step: scale-free step size (see :func:`lit_cb.quant.code_update.linearized_target`).
        sweeps: coordinate-descent sweeps over the codebooks.
        backtracks: retries at half the step after an update that did not lower the batch loss
            (>= 0); the loss check itself is always on.
        offload: hold each layer's G in CPU memory from its backward to the update, and move it to
            the device one layer at a time (the dense model's size in fp32 off the device: 26 GB for
            a 7B model), at one copy each way per layer and attempt.
    """

    def __init__(
        self, every: int, fraction: float, step: float, sweeps: int = 2, backtracks: int = 3, offload: bool = False
    ) -> None:
        super().__init__()
        if every < 1:
            raise ValueError(f"every={every} must be >= 1")
        if backtracks < 0:
            raise ValueError(f"backtracks={backtracks} must be >= 0")
        self.every, self.fraction, self.step, self.sweeps = every, fraction, step, sweeps
        self.backtracks, self.offload = backtracks, offload
        self._hooks: dict[str, _LayerHooks] = {}
        self._batches: list[torch.Tensor] = []  # the active step's micro-batches (input ids)
        self._teacher_logits: list[torch.Tensor | None] | None = None  # theirs, during a guarded update
        # Running sums over all code-update steps so far (checkpointed): name -> [in] float64, tokens.
        self.sq_sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.last_stats = CodeUpdateStats()
        self.last_step = 0.0
        """The step of the last update that was kept (0.0: it was dropped)."""
        self.last_losses: tuple[float, float] = (0.0, 0.0)
        """The batch loss before and after the last update (after = before when it was dropped)."""

    @classmethod
    def from_config(cls, config) -> CodeUpdateCallback:
        c = config
        return cls(
            c.code_update_every,
            c.code_update_fraction,
            c.code_update_step,
            c.code_update_sweeps,
            c.code_update_backtracks,
            c.code_update_offload,
        )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        layers = {name: m for name, m in pl_module.model.named_modules() if isinstance(m, CodebookLinear)}
        if not layers:
            raise ValueError(
                f"recovery.code_update_every={self.every} updates the codes of compressed linears, but the model has "
                "none (compression kept every target dense). Set recovery.code_update_every=0"
            )
        self._hooks = {name: _LayerHooks(m, self.offload) for name, m in layers.items()}

    def _remove_hooks(self) -> None:
        for h in self._hooks.values():
            h.remove()
        self._hooks = {}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._remove_hooks()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        # global_step counts finished optimizer steps: constant over a step's micro-batches.
        active = (trainer.global_step + 1) % self.every == 0
        for h in self._hooks.values():
            h.active = active
        if active:
            self._batches.append(batch["input_ids"])

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        hooks = list(self._hooks.items())
        if not hooks:
            return
        updating = hooks[0][1].active
        total, step = CodeUpdateStats(), 0.0
        if updating:
            statistics = {}
            for name, h in hooks:
                h.active = False
                statistics[name] = self._layer_statistics(name, h)
                h.reset()
            total, step = self._guarded_update(trainer, pl_module, statistics)
        self._batches = []
        # Logged on every step (0 between updates): a value logged only on some steps would be
        # repeated by Lightning on the steps after it until the epoch ends.
        pl_module.log("code_update_changed", float(total.codes_changed), rank_zero_only=True)
        pl_module.log("code_update_groups", float(total.groups), rank_zero_only=True)
        pl_module.log("code_update_step", step, rank_zero_only=True)
        if not updating:
            return
        self.last_stats, self.last_step = total, step
        if trainer.is_global_zero:
            before, after = self.last_losses
            what = f"kept at step {step:g}" if step else f"dropped (no step down to {self._steps()[-1]:g} lowered it)"
            rank_zero_info(
                f"step {trainer.global_step + 1}: code update {what}: {total.codes_changed} codes in "
                f"{total.groups_changed}/{total.groups} selected groups, batch loss {before:.4f} -> {after:.4f}"
            )

    def _steps(self) -> list[float]:
        return [self.step * 0.5**k for k in range(self.backtracks + 1)]

    def _guarded_update(
        self, trainer: L.Trainer, pl_module: L.LightningModule, statistics: dict
    ) -> tuple[CodeUpdateStats, float]:
        """Try the V-step at ``step``, ``step/2``, ...; keep the first that lowers the batch loss."""
        if not self._batches:  # no micro-batch of this step was seen: nothing to check against
            return CodeUpdateStats(), 0.0
        # The teacher's logits of the step's batches, once: every attempt below changes the student
        # only (1 teacher forward per micro-batch instead of 2 + attempts).
        self._teacher_logits = self._teacher_forward(trainer, pl_module)
        try:
            return self._attempts(trainer, pl_module, statistics)
        finally:
            self._teacher_logits = None

    def _teacher_forward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[torch.Tensor | None]:
        if not getattr(pl_module, "distills", False):
            return [None] * len(self._batches)
        with trainer.precision_plugin.forward_context():
            return [pl_module.teacher_logits(ids) for ids in self._batches]

    def _attempts(
        self, trainer: L.Trainer, pl_module: L.LightningModule, statistics: dict
    ) -> tuple[CodeUpdateStats, float]:
        before = self._batch_loss(trainer, pl_module)
        self.last_losses = (before, before)
        for step in self._steps():
            total, undo = CodeUpdateStats(), []
            for name, (grad, sq_mean) in statistics.items():
                stats, restore = self._apply(self._hooks[name].layer, grad, sq_mean, step)
                total = total + stats
                undo.append(restore)
            after = self._batch_loss(trainer, pl_module)
            if after < before:
                self.last_losses = (before, after)
                return total, step
            for restore in undo:
                restore()
        return CodeUpdateStats(groups=total.groups), 0.0

    def _batch_loss(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        """Mean training loss over the step's micro-batches (all ranks), without dropout, at the
        training precision."""
        model = pl_module.model
        was_training = model.training
        model.eval()
        try:
            with trainer.precision_plugin.forward_context():
                cached = self._teacher_logits or [None] * len(self._batches)
                losses = [
                    pl_module.loss_terms(ids, teacher_logits=t)["loss"].double()
                    for ids, t in zip(self._batches, cached, strict=True)
                ]
        finally:
            model.train(was_training)
        count = torch.tensor(float(len(losses)), dtype=torch.float64).to(losses[0])
        sums = torch.stack([torch.stack(losses).sum(), count])
        dist_utils.all_reduce_sum_([sums])
        return float(sums[0] / sums[1])

    def _layer_statistics(self, name: str, h: _LayerHooks) -> tuple[torch.Tensor, torch.Tensor]:
        """``(G, mean x²)`` of one layer, summed over ranks; the running x² sums are updated."""
        layer = h.layer
        device = layer.codebooks.device
        fmt = layer.fmt
        grad = (
            h.grad.to(device) if h.grad is not None else torch.zeros(fmt.out_features, fmt.in_features, device=device)
        )
        sq = h.sq_sum if h.sq_sum is not None else torch.zeros(fmt.in_features, dtype=torch.float64, device=device)
        count = torch.tensor([float(h.tokens)], dtype=torch.float64, device=device)
        # Every rank must call the same collectives in the same order: one per layer, always.
        dist_utils.all_reduce_sum_([sq, count])
        dist_utils.all_reduce_sum_([grad])
        if self.offload:
            grad = grad.cpu()  # back off the device until this layer's V-step (_apply)
        prev = self.sq_sums.get(name)
        self.sq_sums[name] = sq.cpu() if prev is None else prev + sq.cpu()
        self.tokens[name] = self.tokens.get(name, 0) + int(count.item())
        return grad, (self.sq_sums[name] / max(1, self.tokens[name])).to(device)

    def _apply(self, layer: CodebookLinear, grad: torch.Tensor, sq_mean: torch.Tensor, step: float):
        """The V-step on one layer at ``step``, written into its codes; returns its statistics and a
        function that puts the old codes back."""
        fmt = layer.fmt
        nbits = fmt.nbits_per_codebook
        device = layer.codebooks.device
        codes = unpack_codes(layer.codes, nbits)
        grad = grad.to(device)  # no copy unless offloaded
        new, selected, stats = linearized_v_step(
            codes, layer.codebooks.detach(), layer.scales.detach(), grad, sq_mean, self.fraction, step, self.sweeps
        )
        flat_new = new.reshape(-1, fmt.num_codebooks)
        if dist_utils.is_distributed():
            k = torch.tensor([selected.numel()], dtype=torch.int64, device=device)
            dist_utils.broadcast_tensor(k, src=0)
            if int(k.item()) != selected.numel():
                selected = torch.zeros(int(k.item()), dtype=torch.int64, device=device)
            rows = flat_new[selected].contiguous()
            dist_utils.broadcast_tensor(selected, src=0)
            dist_utils.broadcast_tensor(rows, src=0)
        else:
            rows = flat_new[selected]
        flat_codes = layer.codes.view(-1, fmt.num_codebooks)
        old_rows = flat_codes[selected].clone()
        if selected.numel():
            flat_codes[selected] = pack_codes(rows, nbits)

        def restore() -> None:
            if selected.numel():
                flat_codes[selected] = old_rows

        return stats, restore

    def _update_layer(self, name: str, h: _LayerHooks) -> CodeUpdateStats:
        """One layer's unguarded V-step at the configured step (statistics included): the update
        the guard checks, on its own."""
        grad, sq_mean = self._layer_statistics(name, h)
        return self._apply(h.layer, grad, sq_mean, self.step)[0]

    def state_dict(self) -> dict:
        return {
            "sq_sums": {k: v.clone() for k, v in self.sq_sums.items()},
            "tokens": dict(self.tokens),
            "every": self.every,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.sq_sums = {k: v.clone() for k, v in state_dict.get("sq_sums", {}).items()}
        self.tokens = {k: int(v) for k, v in state_dict.get("tokens", {}).items()}
