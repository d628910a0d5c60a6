"""One synchronous data-parallel training step: a rank's batch in, the same update out everywhere.

    step = TrainStep(spec, comm, micro_batch=16, seed=0, momentum=0.9, nesterov=True, weight_decay=5e-4)
    out = step(x, y, global_batch=M, lr=0.05)   # x, y: this rank's whole micro-batches of the batch

1. ``compute``: this rank's micro-batches of m samples in one stacked forward and backward
   pass (up to 16 micro-batches, 128 samples a pass) that computes each micro-batch with the
   shapes, and bits, of a pass of its own (``dpcnn.layers``); each micro-batch's summed
   gradient, loss and correct count are rounded to a fixed grid and added exactly
   (``dpcnn.exact``) into one float64 communication buffer (``StepBuffer``, named views);
2. ``reduce``: one in-place ``Allreduce(SUM)`` of that buffer (the only collective of a step);
   sums of grid values in range never round, so the result is the same whichever rank added
   what and in whatever order. With ``overlap``, the dense layers' part of the buffer (97% of its
   bytes, final first in backward) is reduced by an ``Iallreduce`` started as soon as backward has
   it, progressed by ``test`` calls between the convolution layers' backward steps, and the rest
   (counters and convolution gradients) by an ``Allreduce`` after compute;
3. ``update``: back to float32, divided by the global batch size M, and the same SGD update
   on every rank.

Why the result is the same bits on any number of ranks: every micro-batch is computed whole,
with the same shapes, by exactly one rank (the same float32 bits come out anywhere, given the
same BLAS build, kernel and threads per rank), and the sum over micro-batches is exact. The
trainer and the scaling benchmark both run this; nothing here imports mpi4py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from . import exact
from .comm import Comm, Request
from .model import CNN, ModelSpec
from .optim import SGD, Optimizer

MAX_STACK, MAX_STACK_SAMPLES = 16, 128     # a stacked pass: at most 16 micro-batches, 128 samples


class Diverged(ArithmeticError):
    """The reduced training loss or gradient is not finite or out of range: nothing was applied."""


class StepBuffer:
    """One vector [loss | correct | stop | overflow | gradient (n)], reduced in one call (or in two
    contiguous parts with overlap: counters and convolution gradients, then the dense tail).

    float64 holding exact sums of integers, the gradient in units of ``exact.GRID``, or
    float32 for the plain float path (``exact=False``); ``grads`` is a view of the first n
    entries and the counters are read by name after the reduction.
    """

    def __init__(self, n: int, dtype=np.float64):
        self.array = np.zeros(n + 4, dtype=dtype)
        self._counters = self.array[:4]
        self.grads = self.array[4:]

    def clear(self) -> None:
        self.array[:] = 0

    def set_counters(self, loss_sum: float, correct: int, stop: bool, overflow: bool) -> None:
        self._counters[:] = (loss_sum, correct, int(stop), int(overflow))

    @property
    def loss_sum(self) -> float:
        return float(self._counters[0])

    @property
    def correct(self) -> int:
        return int(self._counters[1])

    @property
    def stop(self) -> bool:
        return bool(self._counters[2] > 0)

    @property
    def overflow(self) -> bool:
        return bool(self._counters[3] > 0)


@dataclass
class StepResult:
    """What one step reports: sums over the global batch, and where this rank's time went."""

    loss_sum: float          # summed training loss over the global batch (before the update)
    correct: int             # correct predictions in the global batch
    samples: int             # the global batch size M
    stop: bool               # some rank asked to stop
    t_compute: float = 0.0   # seconds: forward and backward
    t_allreduce: float = 0.0
    t_update: float = 0.0
    t_dense_wait: float = 0.0  # of t_allreduce, waiting for the overlapped dense part (overlap only)


class TrainStep:
    """The model, its optimizer and the communication buffer of synchronous data-parallel SGD."""

    def __init__(self, spec: ModelSpec, comm: Comm, *, micro_batch: int = 16, seed: int = 0,
                 momentum: float = 0.9, nesterov: bool = True, weight_decay: float = 0.0, exact: bool = True,
                 init: str = "he", dtype=np.float32, overlap: bool = False):
        """exact=False: the plain float path, one pass over the rank's slice and a float32
        allreduce; the same to float32 rounding on any rank count, not the same bits.
        dtype: the model's (float64 for the PyTorch oracle test; training is float32).
        overlap: reduce the dense layers' gradient while the convolution backward runs. The same
        bits as without: exact sums do not depend on the grouping; a float sum does, so the float
        path overlaps only on 2 ranks, where every element is one (commutative) addition whatever
        algorithm MPI picks for either call; on 3 or more ranks it keeps the one Allreduce."""
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        self.comm, self.micro_batch, self.exact = comm, micro_batch, exact
        self.overlap = overlap and comm.size > 1 and (exact or comm.size == 2)
        # micro-batches per stacked pass: all of a rank's at the usual sizes, bounded so that a
        # large per-rank batch does not need gradient rows for all its micro-batches at once
        self.stack = max(1, min(MAX_STACK, MAX_STACK_SAMPLES // micro_batch))
        self.buf = StepBuffer(spec.num_params, np.float64 if exact else dtype)
        self._grad_rows = np.empty((0, spec.num_params), dtype)     # see _rows
        # the float path lets backward write its gradient straight into the buffer
        self.model = CNN(spec, seed=seed, grads=None if exact else self.buf.grads, init=init, dtype=dtype)
        comm.bcast(self.model.params)                    # every rank starts from rank 0's weights
        k = 4 + self.model.dense_offset               # the buffer: [counters | conv grads][dense grads]
        self._rest, self._dense = self.buf.array[:k], self.buf.array[k:]
        self._req: Request | None = None              # the dense part's allreduce, once started
        self.t_dense_wait = 0.0
        self.opt: Optimizer = SGD(self.model.params, self.model.grads, momentum=momentum,
                       nesterov=nesterov and momentum > 0, weight_decay=weight_decay)

    def compute(self, x: np.ndarray, y: np.ndarray, global_batch: int, stop: bool = False) -> None:
        """x (k, H, W, C), y (k,): this rank's whole micro-batches (in order; the last one may be
        short) of a global batch of global_batch samples -> their fixed-point sums in the buffer."""
        self._req = None
        if not self.exact:
            return self._compute_float(x, y, stop)
        m, buf, k = self.micro_batch, self.buf, self.model.dense_offset
        bound = exact.limit(-(-global_batch // m) + 1)     # no sum of all micro-batches can overflow
        full, rest = divmod(len(x), m)
        # the whole micro-batches in stacked passes of up to self.stack, the short last one of a
        # batch (--keep-last) in a pass of its own
        passes = [(i * m, min(i + self.stack, full) - i, m) for i in range(0, full, self.stack)]
        if rest:
            passes.append((full * m, 1, rest))
        loss_fixed, correct, ok = 0, 0, True
        with np.errstate(over="ignore", invalid="ignore"):            # divergence is caught in update
            for j, (start, g, n) in enumerate(passes):
                rows = self._rows(g)
                dense_ok = [True]
                dense_done = self._dense_hook(rows, bound, start == 0, j == len(passes) - 1, dense_ok)
                # each micro-batch's summed loss and gradient in units of the grid: denom = GRID
                # scales them by 2**32, exactly (a power of two)
                loss, c = self.model.loss_and_grad(x[start:start + g * n].reshape((g, n) + x.shape[1:]),
                                                   y[start:start + g * n].reshape(g, n), exact.GRID, rows,
                                                   dense_done, self._poll)
                ok = (dense_ok[0] and bool(np.all(np.abs(loss) <= bound * exact.SCALE))
                      and exact.add_rows(rows[:, :k], buf.grads[:k], bound, overwrite=start == 0))
                if not ok:
                    break
                loss_fixed += sum(round(v) for v in loss.tolist())            # exact: Python integers
                correct += int(c.sum())
        if not passes or not ok:                # no micro-batches here, or a divergence to report
            buf.grads[:k if self._req is not None else None] = 0      # not the part MPI holds now
        buf.set_counters(exact.from_fixed(loss_fixed) if ok else 0.0, correct, stop, not ok)

    def _dense_hook(self, rows: np.ndarray, bound: float, first: bool, last: bool, ok: list[bool]):
        """What backward calls once the dense layers' columns of rows are final: add them into the
        buffer now (ok[0]: whether they passed the bound) and, in a step's last pass with overlap,
        start their reduction. Each part checked against the bound on its own still bounds every
        element, which is what keeps the sums exact."""
        k, acc = self.model.dense_offset, self.buf.grads

        def dense_done() -> None:
            ok[0] = exact.add_rows(rows[:, k:], acc[k:], bound, overwrite=first)
            if last and self.overlap:
                if not ok[0]:
                    acc[k:] = 0
                self._start()
        return dense_done

    def _rows(self, g: int) -> np.ndarray:
        """(g, n) scratch, in the model's dtype, for the micro-batches' gradients; kept from step
        to step (grown when a pass has more micro-batches)."""
        if len(self._grad_rows) < g:
            self._grad_rows = np.empty((g, self.buf.grads.size), self.model.dtype)
        return self._grad_rows[:g]

    def _compute_float(self, x: np.ndarray, y: np.ndarray, stop: bool) -> None:
        """One float32 pass over this rank's slice, its summed gradient written into the buffer."""
        with np.errstate(over="ignore", invalid="ignore"):
            loss, correct = self.model.loss_and_grad(x, y, 1, None, self._start if self.overlap else None,
                                                     self._poll)
        self.buf.set_counters(loss, correct, stop, not np.isfinite(loss))

    def _start(self) -> None:
        """Start the dense part's reduction (once a step, on every rank, before the rest's)."""
        self._req = self.comm.iallreduce(self._dense)

    def _poll(self) -> None:
        """Let MPI progress the started reduction (MPICH does so only inside MPI calls)."""
        if self._req is not None:
            self._req.test()

    def reduce(self) -> None:
        if not self.overlap:
            self.comm.allreduce(self.buf.array)
            return
        if self._req is None:                    # compute did not get as far (no samples, a divergence)
            self._start()
        assert self._req is not None
        self.comm.allreduce(self._rest)          # progresses the dense part too
        t = time.perf_counter()
        self._req.wait()
        self.t_dense_wait = time.perf_counter() - t
        self._req = None

    def update(self, global_batch: int, lr: float) -> None:
        """Mean gradient over the global batch, then the SGD update; Diverged (nothing applied) when
        some rank's loss or gradient was not finite or too large (every rank sees the same flag)."""
        b = self.buf
        if b.overflow:
            raise Diverged("the training loss or a gradient is not finite, or too large to sum exactly")
        if self.exact:
            # units of GRID (float64) -> values (float32): GRID / M = 2**-32 * (1 / M) exactly
            np.multiply(b.grads, exact.GRID / global_batch, out=self.model.grads, casting="unsafe")
        else:
            self.model.grads *= self.model.dtype.type(1.0 / global_batch)
        self.opt.step(lr)

    def __call__(self, x: np.ndarray, y: np.ndarray, global_batch: int, lr: float,
                 stop: bool = False) -> StepResult:
        t0 = time.perf_counter()
        self.compute(x, y, global_batch, stop)
        t1 = time.perf_counter()
        self.reduce()
        t2 = time.perf_counter()
        b = self.buf
        self.update(global_batch, lr)
        t3 = time.perf_counter()
        return StepResult(b.loss_sum, b.correct, global_batch, b.stop, t1 - t0, t2 - t1, t3 - t2,
                          self.t_dense_wait if self.overlap else 0.0)
