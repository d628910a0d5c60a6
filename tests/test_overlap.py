"""Overlapping the allreduce with the backward pass (TrainStep(overlap=True)): the same bits.

The plain tests check the model's hooks and the serial communicator; the MPI ones run on 2 and 3
ranks: `mpiexec -n 3 python -m pytest --with-mpi -m mpi tests/test_overlap.py` (and `-n 2`).
"""

import numpy as np
import pytest

from dpcnn.comm import DoneRequest, SerialComm
from dpcnn.model import CNN, ModelSpec
from dpcnn.step import TrainStep


def _batch(seed: int, n: int):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 28, 28, 1)).astype(np.float32), rng.integers(0, 10, n)


def test_backward_hooks_come_when_the_dense_part_is_final_and_change_no_bits():
    a, b = CNN(seed=3), CNN(seed=3)
    x, y = _batch(0, 8)
    a.loss_and_grad(x, y)
    k = b.dense_offset
    assert k == sum(v.size for name, v in b.p.items() if name.startswith("conv"))
    seen, polls = [], []

    def dense_done():
        seen.append(b.grads[k:].copy())

    b.loss_and_grad(x, y, None, None, dense_done, lambda: polls.append(1))
    assert len(seen) == 1 and np.array_equal(seen[0], a.grads[k:])       # final when announced
    assert len(polls) == 2 * len(b.spec.channels)
    assert np.array_equal(a.grads, b.grads)


def test_serial_comm_overlap_is_a_no_op():
    assert isinstance(SerialComm().iallreduce(np.zeros(3)), DoneRequest)
    assert not TrainStep(ModelSpec(), SerialComm(), overlap=True).overlap


def _run(comm, exact: bool, overlap: bool, steps: int = 4, per_rank: int = 32, m: int = 16, total: int = 0):
    step = TrainStep(ModelSpec(), comm, micro_batch=m, exact=exact, seed=1, weight_decay=5e-4, overlap=overlap)
    losses = []
    for i in range(steps):
        x, y = _batch(100 * i + comm.rank, per_rank)
        r = step(x, y, global_batch=total or per_rank * comm.size, lr=0.05)
        losses.append((r.loss_sum, r.correct))
    return step, losses


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("exact", [True, False])
def test_overlap_gives_the_same_bits(exact):
    from dpcnn.comm import MPIComm

    comm = MPIComm()
    a, la = _run(comm, exact, overlap=False)
    b, lb = _run(comm, exact, overlap=True)
    assert b.overlap == (exact or comm.size == 2)
    assert la == lb
    assert np.array_equal(a.model.params, b.model.params)
    assert np.array_equal(a.opt.velocity, b.opt.velocity)


@pytest.mark.mpi(min_size=2)
def test_exact_overlap_equals_one_process():
    """The exact path with overlap on P ranks: the bits of one process on the whole batch."""
    from dpcnn.comm import MPIComm

    comm = MPIComm()
    shares = comm.allgather_obj(16 * (3 - comm.rank % 2))                          # uneven shares
    b, lb = _run(comm, True, overlap=True, per_rank=shares[comm.rank], total=sum(shares))
    ref = TrainStep(ModelSpec(), SerialComm(), micro_batch=16, exact=True, seed=1, weight_decay=5e-4)
    for i in range(4):
        xs, ys = zip(*(_batch(100 * i + r, n) for r, n in enumerate(shares)), strict=True)
        r = ref(np.concatenate(xs), np.concatenate(ys), global_batch=sum(shares), lr=0.05)
        assert (r.loss_sum, r.correct) == lb[i]
    assert np.array_equal(ref.model.params, b.model.params)


@pytest.mark.mpi(min_size=2)
def test_a_rank_without_samples_still_takes_part():
    """A rank with no micro-batches (or one that diverged before backward) starts the dense
    part's reduction in reduce(), so every rank makes the same collectives in the same order."""
    from dpcnn.comm import MPIComm

    comm = MPIComm()
    for exact in (True, False):
        per_rank = 0 if comm.rank == comm.size - 1 else 16         # micro_bounds: the last rank has none
        step = TrainStep(ModelSpec(), comm, micro_batch=16, exact=exact, seed=1, overlap=True)
        x, y = _batch(comm.rank, per_rank)
        r = step(x, y, global_batch=16 * (comm.size - 1), lr=0.05)
        assert r.samples == 16 * (comm.size - 1)
        assert len(set(comm.allgather_obj(step.model.params.tobytes()))) == 1


@pytest.mark.mpi(min_size=2)
def test_watched_iallreduce_sums_and_names_the_wait():
    from dpcnn.comm import MPIComm
    from dpcnn.watchdog import Watchdog, watched

    comm = MPIComm()
    dog = Watchdog(comm, timeout=60)
    w = watched(comm, dog)
    buf = np.full(100_000, comm.rank, dtype=np.float32)
    req = w.iallreduce(buf)
    req.test()
    req.wait()
    assert np.all(buf == comm.size * (comm.size - 1) / 2) and dog.where is None
