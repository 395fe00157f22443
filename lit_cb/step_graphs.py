"""Recovery's training step replayed from CUDA graphs (``recovery.cuda_graphs``).

Why: a trellis recovery step on the H100 runs about 1 step/s, and the profile of its student forward and
backward (``bench/trellis_step_bench.py``, ``results/trellis_step_h100.json``) says the GPU's kernels take
123 of its 550 ms: the rest is Python and about 7,000 kernel launches. A CUDA graph records those launches
once and replays them with one call, so the step costs what its kernels cost.

What is graphed, at the shape of the first training batch:
- the student's forward from its input embeddings to its logits, and its backward
  (``torch.cuda.make_graphed_callables``: one autograd node whose backward replays the backward graph;
  gradients flow to every trainable parameter as in eager mode; the embedding lookup, the loss, the
  optimizer, clipping and logging stay eager);
- the float teacher's forward (``torch.cuda.graph``; no gradient).

Everything else stays eager: another batch shape (the last, shorter batch), evaluation (no gradient, or the
module in eval mode), and any call after a failed capture or self-check.

The self-check: before the graphs are used, the first batch runs eagerly and from the graphs from the same
RNG state; the logits and the trainable parameters' gradients (of ``logsumexp(logits).mean()``, all of them as
one vector) must agree within ``tolerance`` in relative L2 norm. The two are not bitwise equal: during a capture
transformers builds an explicit causal mask where eager attention uses ``is_causal`` (it cannot read on the
host whether the batch is packed), another attention kernel with other bf16 rounding, about 1% apart at most
in one element (the rotation variants of ``bench/trellis_step_bench.py`` differ by that much); a stale weight
or a lost gradient is off by its whole size. Otherwise, or when a capture raises (a host sync inside the
model, say), the run goes on eagerly and the status says why. The RNG is put back as it was found, so a
resumed run draws the same numbers as an uninterrupted one.

What a graph cannot see: Python-side state. A replay does not run the layers' Python code, so anything that
changes the computation between steps without changing a tensor in place (new code assignments that
rebuild a cached tensor, a parameter replaced by another object) would be missed: ``recovery.cuda_graphs``
is therefore refused with code updates (``code_update_every``) and straight-through codes
(``ste_codes``), and with more than one process (DDP's hooks are not verified under capture).

The captures are injectable (``capture_student``, ``capture_teacher``): tests on the CPU pass eager
stand-ins to check the plumbing (shapes, fallbacks, the self-check, the RNG), the GPU bench
(``bench/recovery_graphs_bench.py``) measures the real thing.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

DEFAULT_TOLERANCE = 2e-2
"""Largest accepted ``||graphed - eager|| / ||eager||`` of the logits and of the gradients (one vector)."""

StudentCapture = Callable[[nn.Module, tuple[torch.Tensor, ...]], Callable[[torch.Tensor], torch.Tensor]]
Forward = Callable[[torch.Tensor], torch.Tensor]
TeacherCapture = Callable[[Forward, torch.Tensor], Forward]


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs matmuls in where it is on (Lightning's bf16-mixed turns it on around the
    step), else None."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _autocast(device_type: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast in ``dtype`` with its weight cache off (a cached cast is a tensor made outside the graph,
    which ``make_graphed_callables`` refuses), or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype, cache_enabled=False)


class StudentLogits(nn.Module):
    """``input embeddings -> logits`` of a causal LM under the step's autocast: the module that is graphed (its
    parameters are the model's, so ``make_graphed_callables`` returns their gradients). The embedding lookup
    stays outside, eager: its backward (a trained embedding's) reads how many distinct tokens the batch has on
    the host, which a capture cannot do; the tied output head is a matmul inside the graph."""

    def __init__(self, model: nn.Module, autocast_dtype: torch.dtype | None, device_type: str) -> None:
        super().__init__()
        self.model = model
        self.autocast_dtype = autocast_dtype
        self.device_type = device_type

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        with _autocast(self.device_type, self.autocast_dtype):
            return self.model(inputs_embeds=embeds, use_cache=False).logits


def cuda_capture_student(module: nn.Module, sample: tuple[torch.Tensor, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The student forward and backward as CUDA graphs (three eager warm-up iterations first, which
    compile the Triton kernels and fill lazily built caches outside the capture)."""
    with _autocast("cuda", getattr(module, "autocast_dtype", None)):
        return torch.cuda.make_graphed_callables(module, sample, num_warmup_iters=3, allow_unused_input=True)


def cuda_capture_teacher(
    forward: Callable[[torch.Tensor], torch.Tensor], sample: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The teacher's forward as one CUDA graph: warmed up on a side stream, captured, then replayed after
    copying each batch into the static input. The returned logits are the graph's static output, valid
    until the next replay (the step consumes them before that)."""
    static_ids = sample.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):
            forward(static_ids)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_out = forward(static_ids)

    def replay(ids: torch.Tensor) -> torch.Tensor:
        static_ids.copy_(ids)
        graph.replay()
        return static_out

    return replay


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _rel_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``||got - ref|| / ||ref||`` (the absolute difference when ``ref`` is zero), in float64."""
    ref = ref.double()
    scale = ref.norm().item()
    return (got.double() - ref).norm().item() / (scale if scale > 0 else 1.0)


@dataclass
class GraphStatus:
    """What the graphs did in this process: shown in the log and the run's metrics."""

    student: str = "not captured"
    """``on``, ``not captured`` (no training batch yet) or ``off: <why>``."""
    teacher: str = "not captured"
    shape: list[int] | None = None
    """The batch shape the graphs replay."""
    check: dict[str, float] = field(default_factory=dict)
    """The self-check's relative differences (``logits``, ``grads``, ``teacher``)."""
    replays: int = 0
    """Student forwards served from the graph."""
    eager: int = 0
    """Training forwards of another shape, run eagerly."""

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("student", "teacher", "shape", "check", "replays", "eager")}


class StepGraphs:
    """The student's and the teacher's forwards for recovery's training step, from CUDA graphs where they
    can be used (module docstring): :meth:`student_logits` and :meth:`teacher_logits` are drop-in
    replacements for the eager calls."""

    def __init__(
        self,
        model: nn.Module,
        teacher: nn.Module | None,
        *,
        tolerance: float = DEFAULT_TOLERANCE,
        capture_student: StudentCapture = cuda_capture_student,
        capture_teacher: TeacherCapture = cuda_capture_teacher,
        log: Callable[[str], None] = print,
    ) -> None:
        if not tolerance > 0:
            raise ValueError(f"StepGraphs tolerance={tolerance!r} must be > 0")
        self.model = model
        self.teacher = teacher
        self.tolerance = tolerance
        self._capture_student = capture_student
        self._capture_teacher = capture_teacher
        self._log = log
        self._student: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._teacher: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._module: StudentLogits | None = None
        self.status = GraphStatus(teacher="not captured" if teacher is not None else "off: no teacher")

    # eager forms --------------------------------------------------------------------------------------
    def _eager_student(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, use_cache=False).logits

    def _eager_teacher(self, ids: torch.Tensor) -> torch.Tensor:
        return self.teacher(input_ids=ids, use_cache=False).logits

    # the step's calls ---------------------------------------------------------------------------------
    def student_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """The student's logits: from the graph for training batches of the captured shape; eagerly
        otherwise (evaluation, no gradient, another shape, graphs off)."""
        training = torch.is_grad_enabled() and self.model.training
        if not training or self.status.student.startswith("off"):
            return self._eager_student(ids)
        if self.status.shape is None:
            self._capture(ids)
            if self.status.student.startswith("off"):
                return self._eager_student(ids)
        if list(ids.shape) != self.status.shape:
            self.status.eager += 1
            return self._eager_student(ids)
        self.status.replays += 1
        return self._graphed_student(ids)

    def _graphed_student(self, ids: torch.Tensor) -> torch.Tensor:
        return self._student(self.model.get_input_embeddings()(ids))

    @torch.no_grad()
    def teacher_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """The teacher's logits (no gradient): from its graph at the captured shape, eagerly otherwise.
        A graphed result is the graph's output buffer: use it before the next call."""
        if self._teacher is not None and list(ids.shape) == self.status.shape:
            return self._teacher(ids)
        return self._eager_teacher(ids)

    # capture and self-check ----------------------------------------------------------------------------
    def _trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _probe(self, fn: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, params: list) -> tuple:
        """Logits and the gradients of ``logsumexp(logits).mean()`` (not accumulated into ``.grad``)."""
        logits = fn(ids)
        grads = torch.autograd.grad(logits.float().logsumexp(-1).mean(), params, allow_unused=True)
        return logits.detach().clone(), [None if g is None else g.detach().clone() for g in grads]

    def _capture(self, ids: torch.Tensor) -> None:
        """Capture both graphs at ``ids``'s shape and check them against eager; on any failure the status
        says why and the step stays eager. The RNG is left as it was found."""
        device = ids.device
        rng = _rng_state(device)
        self.status.shape = list(ids.shape)
        dtype = _autocast_dtype(device.type)
        params = self._trainable()
        try:
            _set_rng_state(rng, device)
            ref_logits, ref_grads = self._probe(self._eager_student, ids, params)
            self._module = StudentLogits(self.model, dtype, device.type)
            with torch.no_grad():
                sample = self.model.get_input_embeddings()(ids)
            embeds_need_grad = any(p.requires_grad for p in self.model.get_input_embeddings().parameters())
            self._student = self._capture_student(self._module, (sample.detach().requires_grad_(embeds_need_grad),))
            _set_rng_state(rng, device)
            got_logits, got_grads = self._probe(self._graphed_student, ids, params)
        except Exception as err:  # noqa: BLE001 (the run goes on eagerly; the status says why)
            self._student = None
            self.status.student = f"off: capture failed ({type(err).__name__}: {err})"[:500]
            self._log(
                f"recovery.cuda_graphs: the student's capture failed, training eagerly: {self.status.student}\n"
                + traceback.format_exc()[-3000:]
            )
            _set_rng_state(rng, device)
            return
        pairs = [(g, r) for g, r in zip(got_grads, ref_grads, strict=True) if r is not None and g is not None]
        missing = sum((g is None) != (r is None) for g, r in zip(got_grads, ref_grads, strict=True))
        grads = (
            _rel_diff(torch.cat([g.flatten() for g, _ in pairs]), torch.cat([r.flatten() for _, r in pairs]))
            if pairs
            else 0.0
        )
        self.status.check = {"logits": _rel_diff(got_logits, ref_logits), "grads": grads}
        worst = max(self.status.check.values())
        if missing or worst > self.tolerance:
            why = f"{missing} gradients missing" if missing else f"differs from eager by {worst:.3g}"
            self._student = None
            self.status.student = f"off: self-check failed ({why} > tolerance {self.tolerance:g})"
            self._log(f"recovery.cuda_graphs: {self.status.student}; training eagerly")
        else:
            self.status.student = "on"
        if self.teacher is not None:
            self._capture_teacher_graph(ids, dtype)
        _set_rng_state(rng, device)
        self._log(f"recovery.cuda_graphs at batch shape {self.status.shape}: {self.status.to_dict()}")

    def _capture_teacher_graph(self, ids: torch.Tensor, dtype: torch.dtype | None) -> None:
        device_type = ids.device.type

        def forward(x: torch.Tensor) -> torch.Tensor:
            with _autocast(device_type, dtype):
                return self._eager_teacher(x)

        try:
            with torch.no_grad():
                ref = self._eager_teacher(ids).clone()
            replay = self._capture_teacher(forward, ids.clone())
            with torch.no_grad():
                diff = _rel_diff(replay(ids), ref)
        except Exception as err:  # noqa: BLE001
            self.status.teacher = f"off: capture failed ({type(err).__name__}: {err})"[:500]
            return
        self.status.check["teacher"] = diff
        if diff > self.tolerance:
            self.status.teacher = f"off: self-check failed (differs from eager by {diff:.3g})"
        else:
            self._teacher = replay
            self.status.teacher = "on"
