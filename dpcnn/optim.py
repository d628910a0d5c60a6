"""SGD with momentum, Nesterov and weight decay on flat vectors, LARS, AdamW, and learning-rate schedules.

The optimizer sees only the flat parameter and gradient vectors of the model (LARS also the
slices that are its layers); its state (the velocity) lives here, not in the layers. Averaging
gradients across ranks happens before ``step`` is called, so nothing here knows about MPI.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np


class Optimizer(Protocol):
    """What the step needs of an optimizer: the flat vectors it updates and reads, its first state
    vector (``velocity``: momentum, or Adam's first moment), and one update."""

    params: np.ndarray
    grads: np.ndarray
    velocity: np.ndarray

    def step(self, lr: float) -> None: ...


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
        self._descend(self._decayed(), lr)

    def _decayed(self) -> np.ndarray:
        """g = grad + weight_decay * w, in scratch space."""
        g = self._g
        np.copyto(g, self.grads)
        if self.weight_decay:
            g += self.weight_decay * self.params
        return g

    def _descend(self, g: np.ndarray, lr: float) -> None:
        """The momentum (and Nesterov) update of the weights along g (which it may overwrite)."""
        w, v, mu = self.params, self.velocity, self.momentum
        if mu:
            v *= mu
            v += g
            if self.nesterov:
                g += mu * v
            else:
                g = v
        w -= np.asarray(lr, dtype=w.dtype) * g


class LARS(SGD):
    """SGD with a layer-wise trust ratio (LARS: You, Gitman and Ginsburg, "Large batch training of
    convolutional networks", 2017): each layer's step is scaled to a fixed fraction of its own
    weights' size, so that a learning rate large enough for one layer does not blow up another.

        for each layer l (a slice of the flat vectors):
            ratio_l = trust * ||w_l|| / (||grad_l|| + weight_decay * ||w_l||)   (1 if a norm is 0)
            g_l = ratio_l * (grad_l + weight_decay * w_l)
        v = momentum * v + g
        w -= lr * (g + momentum * v   if nesterov   else v)

    layers: the slices of the flat vectors that are layers (each weight array and each bias
    vector is one). The state is the velocity alone, as SGD's: the ratios are computed afresh
    from w and grad at every step (norms in float64), so a resumed run continues bit for bit.
    """

    def __init__(self, params: np.ndarray, grads: np.ndarray, layers: list[slice], momentum: float = 0.9,
                 nesterov: bool = False, weight_decay: float = 0.0, trust: float = 0.001):
        super().__init__(params, grads, momentum, nesterov, weight_decay)
        if trust <= 0:
            raise ValueError(f"LARS needs trust > 0, got {trust}")
        self.layers, self.trust = list(layers), trust

    def ratios(self) -> list[float]:
        """ratio_l of every layer, for the current weights and gradient."""
        out = []
        for s in self.layers:
            w_norm, g_norm = norm(self.params[s]), norm(self.grads[s])
            ok = w_norm > 0 and g_norm > 0
            out.append(self.trust * w_norm / (g_norm + self.weight_decay * w_norm) if ok else 1.0)
        return out

    def step(self, lr: float) -> None:
        ratios = self.ratios()
        g = self._decayed()
        for s, ratio in zip(self.layers, ratios, strict=True):
            g[s] *= ratio
        self._descend(g, lr)


class AdamW:
    """Adam with decoupled weight decay (Loshchilov and Hutter 2019), the update rule of PyTorch's
    AdamW, on the flat vectors:

        w *= 1 - lr * weight_decay
        m = beta1 * m + (1 - beta1) * g                  (``velocity``, as SGD's momentum)
        s = beta2 * s + (1 - beta2) * g * g              (``second``)
        w -= lr / (1 - beta1^t) * m / (sqrt(s) / sqrt(1 - beta2^t) + eps)

    t is the number of updates so far (1 at the first): its state is m, s and t, all three in a
    checkpoint (t as the run's step), so a resumed run continues bit for bit. Elementwise on the
    reduced gradient, so every rank makes the same update.
    """

    def __init__(self, params: np.ndarray, grads: np.ndarray, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        self.params, self.grads = params, grads
        self.beta1, self.beta2, self.eps, self.weight_decay = betas[0], betas[1], eps, weight_decay
        self.velocity = np.zeros_like(params)           # first moment
        self.second = np.zeros_like(params)             # second moment
        self.t = 0                                      # updates so far
        self._a, self._b = np.empty_like(params), np.empty_like(params)

    def step(self, lr: float) -> None:
        w, g, m, s, a, b = self.params, self.grads, self.velocity, self.second, self._a, self._b
        f = w.dtype.type
        self.t += 1
        if self.weight_decay:
            w *= f(1 - lr * self.weight_decay)
        m *= f(self.beta1)                              # m = beta1 * m + (1 - beta1) * g
        np.multiply(g, f(1 - self.beta1), out=a)
        m += a
        s *= f(self.beta2)                              # s = beta2 * s + (1 - beta2) * g * g
        np.multiply(g, g, out=a)
        a *= f(1 - self.beta2)
        s += a
        np.sqrt(s, out=b)                               # the denominator, bias-corrected
        b *= f(1 / math.sqrt(1 - self.beta2 ** self.t))
        b += f(self.eps)
        np.divide(m, b, out=a)
        a *= f(lr / (1 - self.beta1 ** self.t))
        w -= a


def norm(x: np.ndarray) -> float:
    """The Euclidean norm of a vector, summed in float64."""
    x = x.astype(np.float64)
    return math.sqrt(float(np.dot(x, x)))


OPTIMIZERS = ("sgd", "lars", "adamw")
REFERENCE_BATCH = 64                    # --lr is the learning rate at this global batch
LR_SCALINGS = ("none", "linear", "sqrt")


def scaled_lr(lr: float, batch: int, scaling: str) -> float:
    """The learning rate for a global batch of `batch`, given `lr` at REFERENCE_BATCH: the same
    ('none'), times batch / 64 ('linear', Goyal et al. 2017) or times sqrt(batch / 64) ('sqrt',
    Krizhevsky 2014; Hoffer et al. 2017)."""
    if scaling not in LR_SCALINGS:
        raise ValueError(f"scaling must be one of {', '.join(LR_SCALINGS)}, got {scaling!r}")
    k = batch / REFERENCE_BATCH
    return lr * {"none": 1.0, "linear": k, "sqrt": math.sqrt(k)}[scaling]


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
