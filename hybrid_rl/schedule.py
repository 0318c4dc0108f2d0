"""The learning-rate schedule both trainers use: linear warmup, then cosine decay to a floor.

The rate is a pure function of the step (set by hand on the optimizer each step, no scheduler object),
so a resumed run needs nothing but its step to continue on the same curve.
"""

from __future__ import annotations

import math

__all__ = ["warmup_cosine"]


def warmup_cosine(step: int, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """The rate of 0-based ``step``: ``lr * (step + 1) / warmup_steps`` during warmup, then cosine from
    ``lr`` to ``lr * min_lr_ratio`` at ``total_steps`` (and that floor after it). ``min_lr_ratio=1`` is a
    constant rate after warmup."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * cosine)
