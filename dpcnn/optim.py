"""SGD with momentum, Nesterov and weight decay on flat vectors, and learning-rate schedules.

The optimizer sees only the flat parameter and gradient vectors of the model; its
state (the velocity) lives here, not in the layers. Averaging gradients across
ranks happens before ``step`` is called, so nothing here knows about MPI.
"""

from __future__ import annotations

import math

import numpy as np


class SGD:
    """Stochastic gradient descent, with the update rule PyTorch's SGD uses.

        g = grad + weight_decay * w
        v = momentum * v + g
        w -= lr * (g + momentum * v   if nesterov   else v)

    params, grads: flat vectors of the same shape and dtype; ``step`` updates
    params in place.
    """

    def __init__(self, params: np.ndarray, grads: np.ndarray, momentum: float = 0.9,
                 nesterov: bool = False, weight_decay: float = 0.0):
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        self.params, self.grads = params, grads
        self.momentum, self.nesterov, self.weight_decay = momentum, nesterov, weight_decay
        self.velocity = np.zeros_like(params)
        self._g = np.empty_like(params)

    def step(self, lr: float) -> None:
        w, g, v, mu = self.params, self._g, self.velocity, self.momentum
        np.copyto(g, self.grads)
        if self.weight_decay:
            g += self.weight_decay * w
        if mu:
            v *= mu
            v += g
            if self.nesterov:
                g += mu * v
            else:
                g = v
        w -= np.asarray(lr, dtype=w.dtype) * g


SCHEDULES = ("constant", "step", "cosine")


class Schedule:
    """Learning rate as a function of the global step.

    kind: 'constant'; 'step' (multiply by gamma after each of ``milestones``,
    given as steps); 'cosine' (from lr down to min_lr at total_steps). Any kind
    can start with a linear warm-up over ``warmup_steps`` from lr / warmup_steps.
    """

    def __init__(self, kind: str, lr: float, total_steps: int, warmup_steps: int = 0,
                 milestones: tuple[int, ...] = (), gamma: float = 0.1, min_lr: float = 0.0):
        if kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {kind!r}")
        self.kind, self.lr, self.total_steps = kind, lr, max(int(total_steps), 1)
        self.warmup_steps, self.milestones = int(warmup_steps), tuple(sorted(milestones))
        self.gamma, self.min_lr = gamma, min_lr

    def __call__(self, step: int) -> float:
        """The learning rate for the update after ``step`` earlier updates (step >= 0)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.lr
        if self.kind == "step":
            return self.lr * self.gamma ** sum(step >= m for m in self.milestones)
        t = (step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1)
        t = min(max(t, 0.0), 1.0)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * t))
