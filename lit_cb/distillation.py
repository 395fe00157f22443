"""Memory-lean losses of recovery distillation.

Logits of a 49k vocabulary are big: at batch 4 x 2048 tokens one float32 copy is 1.6 GB. The plain
``F.kl_div(F.log_softmax(s.float()), F.log_softmax(t.float()))`` holds four such copies in the forward
and saves two for the backward. :class:`ChunkedKL` walks the tokens in chunks, computes the loss and
its gradient in float32 one chunk at a time, and keeps only the gradient (in the logits' own dtype,
bf16 under bf16-mixed) for the backward: the gradient of ``T² · KL(p_t || p_s)`` with respect to the
student logits is ``T · (p_s - p_t)``, divided by the number of tokens for the mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_TOKENS = 1024


class ChunkedKL(torch.autograd.Function):
    """Mean over tokens of ``T² · KL(softmax(t/T) || softmax(s/T))``, chunked over tokens."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, temperature: float, chunk: int) -> torch.Tensor:
        s, t = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
        n = s.shape[0]
        grad = torch.empty_like(s) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=torch.float32, device=s.device)
        for i in range(0, n, chunk):
            log_ps = F.log_softmax(s[i : i + chunk].float() / temperature, dim=-1)
            log_pt = F.log_softmax(t[i : i + chunk].float() / temperature, dim=-1)
            pt = log_pt.exp()
            total += (pt * (log_pt - log_ps)).sum()
            if grad is not None:
                grad[i : i + chunk] = (log_ps.exp_().sub_(pt)).mul_(temperature / n)
            del log_ps, log_pt, pt
        ctx.save_for_backward(grad if grad is not None else torch.empty(0))
        ctx.shape = student.shape
        return total * (temperature**2 / n)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * grad_output.to(grad.dtype)).view(ctx.shape), None, None, None


def kl_to_teacher(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, chunk: int = DEFAULT_CHUNK_TOKENS
) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) at temperature T, scaled by T² (float32 scalar)."""
    return ChunkedKL.apply(student_logits, teacher_logits.detach(), float(temperature), int(chunk))


@torch.no_grad()
def next_token_cross_entropy(
    logits: torch.Tensor, ids: torch.Tensor, chunk: int = DEFAULT_CHUNK_TOKENS
) -> torch.Tensor:
    """Causal-LM cross-entropy without a graph, chunked (for logging when the loss is pure KL)."""
    s = logits[:, :-1].reshape(-1, logits.shape[-1])
    target = ids[:, 1:].reshape(-1)
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for i in range(0, s.shape[0], chunk):
        total += F.cross_entropy(s[i : i + chunk].float(), target[i : i + chunk], reduction="sum")
    return total / max(1, s.shape[0])
