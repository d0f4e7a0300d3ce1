"""The pieces of a training loop that the bundled models share (tiny diffusion model, tiny causal LM)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch


def warmup_cosine(warmup: int, steps: int, min_frac: float = 0.0) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to ``min_frac`` at ``steps``."""

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * frac))

    return lr_at


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
                   params: Iterable[torch.nn.Parameter], clip: float) -> float:
    """Backward, clip the gradient norm, step optimizer and schedule; the loss as a float."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    sched.step()
    return float(loss.detach())
