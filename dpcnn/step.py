"""One synchronous data-parallel training step: a rank's batch in, the same update out everywhere.

    step = TrainStep(spec, comm, micro_batch=16, seed=0, momentum=0.9, nesterov=True, weight_decay=5e-4)
    out = step(x, y, global_batch=M, lr=0.05)   # x, y: this rank's whole micro-batches of the batch

1. ``compute``: this rank's micro-batches of m samples in one stacked forward and backward
   pass (up to 16 micro-batches, 128 samples a pass) that computes each micro-batch with the
   shapes, and bits, of a pass of its own (``dpcnn.layers``); each micro-batch's summed
   gradient, loss and correct count are rounded to a fixed grid and added exactly
   (``dpcnn.exact``) into one float64 communication buffer (``StepBuffer``, named views);
   At global batches of up to 110 samples (the default 64 among them), fc1's weight gradient (97%
   of the parameters) is not summed per micro-batch: each rank keeps its samples' two factors of
   it (fc1's inputs and the gradients at its outputs), every rank gathers all of them in the
   order of the global batch and computes the one product over the batch itself (``Gathered``):
   no rounding to the grid, and fewer bytes to send than the gradient's;
2. ``reduce``: one in-place ``Allreduce(SUM)`` of that buffer (with gathered factors, of its
   counters and convolution sums, beside one ``Iallgather`` of the factors and the dense tail's
   partial sums); sums of grid values in range never round, so the result is the same whichever
   rank added what and in whatever order. With ``overlap``, the dense layers' part (97% of the
   bytes, final first in backward) is reduced (or gathered) by a non-blocking call started as soon
   as backward has it, progressed by ``test`` calls between the convolution layers' backward
   steps, and the rest (counters and convolution gradients) by an ``Allreduce`` after compute;
3. ``update``: back to float32, divided by the global batch size M (the gathered product
   computed first, the same on every rank), and the same SGD update on every rank.

Why the result is the same bits on any number of ranks: every micro-batch is computed whole,
with the same shapes, by exactly one rank (the same float32 bits come out anywhere, given the
same BLAS build, kernel and threads per rank), the sum over micro-batches is exact, and a
gathered product has the same inputs and shapes on every rank count. The
trainer and the scaling benchmark both run this; nothing here imports mpi4py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from . import exact
from .comm import Comm, Request
from .data import micro_bounds
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


class Gathered:
    """How the exact step reduces a global batch of M samples whose large dense layers' weight
    gradients come from gathered factors (``TrainStep.factored``).

    A dense layer's weight gradient over the batch is x^T @ dout, x (M, D) its inputs and dout
    (M, F) the gradients at its outputs, in units of the grid. When M (D + F) <= D F, these
    factors are no more values than the gradient itself: every rank sends its samples' rows of
    both, one ``Iallgather`` gives every rank all M rows in the order of the global batch (the
    ranks hold contiguous runs of micro-batches), and every rank computes the one product with K
    = M itself. The same inputs and shapes on every rank and on any rank count: the same bits,
    with no rounding to the grid and no 4-byte-per-parameter float64 sum to reduce. The other
    parameters of the dense tail (biases, small layers) are grid sums as before, sent in the same
    block as float64 partial sums that every rank adds up (exactly, in any order); the counters
    and the convolution layers' sums stay in the ``Allreduce``.

    One rank's block, in the model's dtype: [partial sums (S float64) | for each layer: x rows
    (n_max, D), dout rows (n_max, F)], n_max the most samples any rank holds, padded to a whole
    number of float64s.
    """

    def __init__(self, model: CNN, layers: tuple[int, ...], M: int, m: int, size: int):
        self.layers, dt = layers, model.dtype
        w = 8 // dt.itemsize                                   # slots of the block per float64
        self.counts = [hi - lo for lo, hi in (micro_bounds(M, m, r, size) for r in range(size))]
        n_max, o = max(self.counts), model.dense_offset
        spans = {name: (a, a + int(np.prod(shape))) for name, shape, a in _spans(model)}
        weights = [spans[f"fc{i}.w"] for i in layers]
        # the dense tail's parameters that are grid sums: [o, end) less the factored weights
        self.segments, a = [], o
        for lo, hi in sorted(weights):
            if lo > a:
                self.segments.append((a, lo))
            a = hi
        if a < model.spec.num_params:
            self.segments.append((a, model.spec.num_params))
        S = sum(b - a for a, b in self.segments)
        self.shapes = {i: model.p[f"fc{i}.w"].shape for i in layers}
        self.offsets, off = {}, w * S
        for i in layers:
            D, F = self.shapes[i]
            self.offsets[i] = (off, off + n_max * D)
            off += n_max * (D + F)
        block = -(-off // w) * w                  # each rank's block starts on a float64 boundary
        self.send = np.zeros(block, dt)
        self.recv = np.zeros((size, block), dt)
        self.partials = self.send[:w * S].view(np.float64)             # this rank's grid sums
        self.x = {i: np.empty((M, self.shapes[i][0]), dt) for i in layers}
        self.dout = {i: np.empty((M, self.shapes[i][1]), dt) for i in layers}
        self.S, self._w = S, w

    def put(self, model: CNN, start: int, count: int) -> None:
        """Copy the factors of the pass just computed (this rank's samples [start, start + count))
        into the send block."""
        for i in self.layers:
            x, dout = model.factors[i]
            (D, F), (ox, od) = self.shapes[i], self.offsets[i]
            np.copyto(self.send[ox + start * D:ox + (start + count) * D].reshape(count, D), x.reshape(count, D))
            np.copyto(self.send[od + start * F:od + (start + count) * F].reshape(count, F), dout.reshape(count, F))
        model.factors = {}

    def sums(self) -> np.ndarray:
        """The grid sums over all ranks (after the gather): (S,) float64, exact."""
        return self.recv[:, :self._w * self.S].view(np.float64).sum(axis=0)

    def product(self, i: int, out: np.ndarray) -> None:
        """Layer i's weight gradient over the global batch, in units of the grid, into out (D, F):
        every rank's rows in rank order (the order of the batch), then one product."""
        (D, F), (ox, od) = self.shapes[i], self.offsets[i]
        x, dout, lo = self.x[i], self.dout[i], 0
        for r, n in enumerate(self.counts):
            np.copyto(x[lo:lo + n], self.recv[r, ox:ox + n * D].reshape(n, D))
            np.copyto(dout[lo:lo + n], self.recv[r, od:od + n * F].reshape(n, F))
            lo += n
        np.matmul(x.T, dout, out=out)


def _spans(model: CNN):
    o = 0
    for name, shape in model.shapes:
        yield name, shape, o
        o += int(np.prod(shape))


class TrainStep:
    """The model, its optimizer and the communication buffer of synchronous data-parallel SGD."""

    def __init__(self, spec: ModelSpec, comm: Comm, *, micro_batch: int = 16, seed: int = 0,
                 momentum: float = 0.9, nesterov: bool = True, weight_decay: float = 0.0, exact: bool = True,
                 init: str = "he", dtype=np.float32, overlap: bool = False, gather: bool = True):
        """exact=False: the plain float path, one pass over the rank's slice and a float32
        allreduce; the same to float32 rounding on any rank count, not the same bits.
        dtype: the model's (float64 for the PyTorch oracle test; training is float32).
        overlap: reduce the dense layers' gradient while the convolution backward runs. The same
        bits as without: exact sums do not depend on the grouping; a float sum does, so the float
        path overlaps only on 2 ranks, where every element is one (commutative) addition whatever
        algorithm MPI picks for either call; on 3 or more ranks it keeps the one Allreduce.
        gather: exact only: the weight gradients of dense layers that qualify (``Gathered``) from
        gathered factors; False: every gradient a grid sum (the exact step before; other bits)."""
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
        self._req: Request | None = None              # the dense part's allreduce (or allgather), once started
        self.gather = gather and exact
        self._plans: dict[int, Gathered | None] = {}
        self._plan: Gathered | None = None            # this step's, when it gathers
        self.t_dense_wait = 0.0
        self.opt: Optimizer = SGD(self.model.params, self.model.grads, momentum=momentum,
                       nesterov=nesterov and momentum > 0, weight_decay=weight_decay)

    def compute(self, x: np.ndarray, y: np.ndarray, global_batch: int, stop: bool = False) -> None:
        """x (k, H, W, C), y (k,): this rank's whole micro-batches (in order; the last one may be
        short) of a global batch of global_batch samples -> their fixed-point sums in the buffer.
        The exact step needs the rank's own share, ``data.micro_bounds(global_batch, micro_batch,
        rank, size)`` (as the loader deals them): the gathered factors are read back by those
        counts."""
        self._req = None
        if not self.exact:
            return self._compute_float(x, y, stop)
        m, buf, k = self.micro_batch, self.buf, self.model.dense_offset
        plan = self._plan = self.plan(global_batch)
        if plan is not None and len(x) != plan.counts[self.comm.rank]:
            raise ValueError(f"rank {self.comm.rank} got {len(x)} samples of a global batch of {global_batch}; "
                             f"the exact step needs micro_bounds' {plan.counts[self.comm.rank]}")
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
                last = j == len(passes) - 1
                dense_done = (self._gather_hook(plan, rows, bound, start, g * n, last, dense_ok) if plan else
                              self._dense_hook(rows, bound, start == 0, last, dense_ok))
                # each micro-batch's summed loss and gradient in units of the grid: denom = GRID
                # scales them by 2**32, exactly (a power of two)
                loss, c = self.model.loss_and_grad(x[start:start + g * n].reshape((g, n) + x.shape[1:]),
                                                   y[start:start + g * n].reshape(g, n), exact.GRID, rows,
                                                   dense_done, self._poll, plan.layers if plan else ())
                ok = (dense_ok[0] and bool(np.all(np.abs(loss) <= bound * exact.SCALE))
                      and exact.add_rows(rows[:, :k], buf.grads[:k], bound, overwrite=start == 0))
                if not ok:
                    break
                loss_fixed += sum(round(v) for v in loss.tolist())            # exact: Python integers
                correct += int(c.sum())
        if not passes or not ok:                # no micro-batches here, or a divergence to report
            if plan is not None:
                buf.grads[:k] = 0
                if self._req is None:                                     # not what MPI holds now
                    plan.partials[:] = 0
            else:
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

    def _gather_hook(self, plan: Gathered, rows: np.ndarray, bound: float, start: int, count: int, last: bool,
                     ok: list[bool]):
        """The dense hook when the step gathers: the dense tail's grid sums into the send block,
        the pass's factors beside them and, in a step's last pass with overlap, the gather
        started."""
        acc = plan.partials

        def dense_done() -> None:
            o, good = 0, True
            for a, b in plan.segments:
                good = good and exact.add_rows(rows[:, a:b], acc[o:o + b - a], bound, overwrite=start == 0)
                o += b - a
            ok[0] = good
            plan.put(self.model, start, count)
            if last and self.overlap:
                self._start()
        return dense_done

    def plan(self, global_batch: int) -> Gathered | None:
        """How a global batch of this size is reduced: a ``Gathered`` naming the dense layers
        whose gathered factors are no more values than their weight gradient, or None (every
        gradient a grid sum in the one Allreduce). A function of the batch size and the model,
        never of the rank count, so that every rank count computes the same."""
        if not self.gather:
            return None
        if global_batch not in self._plans:
            if len(self._plans) >= 4:                 # a few sizes: the batch and an epoch's last
                self._plans.pop(next(iter(self._plans)))
            M = global_batch
            layers = tuple(i for i in range(1, len(self.model.spec.hidden) + 2)
                           if M * sum(self.model.p[f"fc{i}.w"].shape) <= self.model.p[f"fc{i}.w"].size)
            self._plans[M] = Gathered(self.model, layers, M, self.micro_batch, self.comm.size) if layers else None
        return self._plans[global_batch]

    def message_bytes(self, global_batch: int) -> int:
        """What one rank puts into the step's collectives: the Allreduce's buffer, or with gathered
        factors its front part and the rank's block of the gather."""
        plan = self.plan(global_batch)
        if plan is None:
            return self.buf.array.nbytes
        return self._rest.nbytes + plan.send.nbytes

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
        if self._plan is not None:
            self._req = self.comm.iallgather(self._plan.send, self._plan.recv)
        else:
            self._req = self.comm.iallreduce(self._dense)

    def _poll(self) -> None:
        """Let MPI progress the started reduction (MPICH does so only inside MPI calls)."""
        if self._req is not None:
            self._req.test()

    def reduce(self) -> None:
        if not self.overlap and self._plan is None:
            self.comm.allreduce(self.buf.array)
            return
        if self._req is None:                    # not overlapped, or compute did not get as far
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
        scale = (exact.GRID / global_batch)              # units of GRID to values, and the mean
        if self._plan is not None and self.exact:
            self._update_gathered(self._plan, scale)
        elif self.exact:
            # units of GRID (float64) -> values (float32): GRID / M = 2**-32 * (1 / M) exactly
            np.multiply(b.grads, scale, out=self.model.grads, casting="unsafe")
        else:
            self.model.grads *= self.model.dtype.type(1.0 / global_batch)
        self.opt.step(lr)

    def _update_gathered(self, plan: Gathered, scale: float) -> None:
        """The gradient of a gathering step: the grid sums scaled, the gathered products computed
        (the same on every rank) and scaled; Diverged when a product is not finite."""
        g, k = self.model.grads, self.model.dense_offset
        np.multiply(self.buf.grads[:k], scale, out=g[:k], casting="unsafe")
        sums, o = plan.sums(), 0
        for a, b in plan.segments:
            np.multiply(sums[o:o + b - a], scale, out=g[a:b], casting="unsafe")
            o += b - a
        n = -(-sum(plan.counts) // self.micro_batch)            # micro-batches in the global batch
        for i in plan.layers:
            w = self.model.g[f"fc{i}.w"]
            with np.errstate(over="ignore", invalid="ignore"):
                plan.product(i, w)
                flat = w.reshape(-1)
                sq = np.dot(flat, flat)                     # inf or nan when w is not finite
            # the range the grid sums keep to (each micro-batch's part below limit(n + 1)): a
            # diverging product is refused here, on every rank alike, before anything is applied
            if not sq <= (n * exact.limit(n + 1) * exact.SCALE) ** 2:
                raise Diverged("the training loss or a gradient is not finite, or too large to sum exactly")
            w *= w.dtype.type(scale)

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
