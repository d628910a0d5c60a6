"""One synchronous data-parallel training step: a rank's batch in, the same update out everywhere.

    step = TrainStep(spec, comm, seed=0, momentum=0.9, nesterov=True, weight_decay=5e-4)
    out = step(x, y, global_batch=M, lr=0.05)          # x, y: this rank's slice of the batch

1. ``compute``: forward and backward over this rank's slice, the gradient *summed* over its
   samples, written into the gradient view of one communication buffer beside the loss sum,
   the correct count and a stop flag (``StepBuffer``: named views, one contiguous vector);
2. ``reduce``: one in-place ``Allreduce(SUM)`` of that buffer (the only collective of a step);
3. ``update``: divide by the global batch size M (exact with uneven slices) and apply the same
   SGD update on every rank, so the parameters stay identical everywhere.

The trainer and the scaling benchmark both run this; nothing here imports mpi4py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .comm import Comm
from .model import CNN, ModelSpec
from .optim import SGD


class Diverged(ArithmeticError):
    """The reduced training loss is not finite: the update was not applied."""

    def __init__(self, loss: float):
        super().__init__(f"the training loss is {loss}")
        self.loss = loss


class StepBuffer:
    """One float32 vector [gradient (n) | loss sum | correct count | stop flag], reduced in one call.

    ``grads`` is a view of the first n entries; the counters are read and written by name.
    """

    def __init__(self, n: int):
        self.array = np.zeros(n + 3, dtype=np.float32)
        self.grads = self.array[:n]
        self._counters = self.array[n:]

    @property
    def loss_sum(self) -> float:
        return float(self._counters[0])

    @property
    def correct(self) -> float:
        return float(self._counters[1])

    @property
    def stop(self) -> bool:
        return bool(self._counters[2] > 0)

    def set_counters(self, loss_sum: float, correct: float, stop: bool) -> None:
        self._counters[:] = (loss_sum, correct, 1.0 if stop else 0.0)


@dataclass
class StepResult:
    """What one step reports: sums over the global batch, and where this rank's time went."""

    loss_sum: float          # summed training loss over the global batch (before the update)
    correct: float           # correct predictions in the global batch
    samples: int             # the global batch size M
    stop: bool               # some rank asked to stop
    t_compute: float = 0.0   # seconds: forward and backward
    t_allreduce: float = 0.0
    t_update: float = 0.0


class TrainStep:
    """The model, its optimizer and the communication buffer of synchronous data-parallel SGD."""

    def __init__(self, spec: ModelSpec, comm: Comm, *, seed: int = 0, momentum: float = 0.9,
                 nesterov: bool = True, weight_decay: float = 0.0):
        self.comm = comm
        self.buf = StepBuffer(spec.num_params)
        self.model = CNN(spec, seed=seed, grads=self.buf.grads)
        comm.bcast(self.model.params)                    # every rank starts from rank 0's weights
        self.opt = SGD(self.model.params, self.model.grads, momentum=momentum,
                       nesterov=nesterov and momentum > 0, weight_decay=weight_decay)

    def compute(self, x: np.ndarray, y: np.ndarray, stop: bool = False) -> None:
        """x (m, H, W, C), y (m,): this rank's slice -> summed gradient and counters in the buffer."""
        with np.errstate(over="ignore", invalid="ignore"):            # divergence is caught in update
            loss_sum, correct = self.model.loss_and_grad(x, y, denom=1)
        self.buf.set_counters(loss_sum, correct, stop)

    def reduce(self) -> None:
        self.comm.allreduce(self.buf.array)

    def update(self, global_batch: int, lr: float) -> None:
        """Mean gradient over the global batch, then the SGD update; Diverged (nothing applied)
        when the reduced loss is not finite (every rank sees the same sum, so all raise)."""
        if not np.isfinite(self.buf.loss_sum):
            raise Diverged(self.buf.loss_sum)
        self.model.grads *= np.float32(1.0 / global_batch)
        self.opt.step(lr)

    def __call__(self, x: np.ndarray, y: np.ndarray, global_batch: int, lr: float,
                 stop: bool = False) -> StepResult:
        t0 = time.perf_counter()
        self.compute(x, y, stop)
        t1 = time.perf_counter()
        self.reduce()
        t2 = time.perf_counter()
        b = self.buf
        self.update(global_batch, lr)
        t3 = time.perf_counter()
        return StepResult(b.loss_sum, b.correct, global_batch, b.stop, t1 - t0, t2 - t1, t3 - t2)
