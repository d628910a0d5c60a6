"""Distributed tests, run on 2 and 3 ranks: `mpiexec -n 3 python -m pytest --with-mpi -m mpi`.

Closed-form collectives, a P-rank step against the single-process step on the same
global batch (3 ranks: an uneven split), and a whole training run that must leave
identical parameters on every rank. Plain `pytest` skips these.
"""

import json
import socket

import numpy as np
import pytest
from conftest import write_tiny

from dpcnn.comm import MPIComm, check_in_sync, digest, on_root
from dpcnn.config import Config
from dpcnn.data import ShardedLoader, Split, shard_bounds
from dpcnn.model import CNN, ModelSpec
from dpcnn.step import TrainStep
from dpcnn.train import train
from dpcnn.watchdog import Watchdog, watched

pytestmark = pytest.mark.mpi(min_size=2)


@pytest.fixture(scope="module")
def comm():
    return MPIComm()


@pytest.fixture
def tiny(comm, mpi_tmp_path):
    """The tiny data set, written once by rank 0 into the directory all ranks share."""
    path = mpi_tmp_path / "tiny.h5"
    if comm.is_root:
        write_tiny(path)
    comm.barrier()
    return path


def test_allreduce_bcast_closed_form(comm):
    P, r = comm.size, comm.rank
    buf = np.full(1000, r, dtype=np.float32)
    comm.allreduce(buf)
    assert np.all(buf == P * (P - 1) / 2)
    x = np.arange(5, dtype=np.float64) * (r + 1)
    comm.bcast(x, root=P - 1)
    assert np.array_equal(x, np.arange(5) * P)
    assert comm.bcast_obj({"rank": r}) == {"rank": 0}
    assert comm.allgather_obj(r) == list(range(P))
    hosts = comm.allgather_obj(socket.gethostname())
    assert comm.num_nodes == len(set(hosts)) and comm.local_size == hosts.count(hosts[r])


def test_the_watched_communicator_gives_the_same_closed_forms(comm):
    """The trainer's communicator (every collective tells the watchdog where it waits) is MPIComm's
    every collective, not an inherited no-op."""
    dog = Watchdog(comm, timeout=60)                   # not started: only told where this rank waits
    w = watched(comm, dog)
    P, r = comm.size, comm.rank
    buf = np.full(10, r, dtype=np.float32)
    w.allreduce(buf)
    assert np.all(buf == P * (P - 1) / 2)
    x = np.arange(3, dtype=np.float64) * (r + 1)
    w.bcast(x, root=P - 1)
    assert np.array_equal(x, np.arange(3) * P)
    assert w.bcast_obj(r) == 0 and w.allgather_obj(r) == list(range(P))
    w.barrier()
    assert w.node_cpus() == comm.node_cpus() and (w.rank, w.size) == (r, P)
    assert on_root(w, lambda: r + 5, "adding") == 5                  # rank 0's job, everyone's result
    assert dog.where is None and dog.doing is None and dog.behind is None


def test_mpi_gives_the_watchdog_the_thread_level_it_needs(comm):
    """MPI_Abort from the watchdog's thread while the main thread waits in a collective needs
    MPI_THREAD_MULTIPLE (here as pytest-mpi initialised MPI, with mpi4py's defaults)."""
    assert comm.thread_level == "multiple"
    assert comm.versions()["mpi_thread_level"] == "multiple" and "\0" not in comm.versions()["mpi"]


@pytest.mark.parametrize("batch", [12, 10, 2])   # 10 on 3 ranks: 4, 3, 3; 2 on 3 ranks: one rank empty
def test_distributed_step_equals_single_process_step(comm, tiny, batch):
    split = Split(tiny)
    P, r = comm.size, comm.rank
    mine = ShardedLoader(split, batch_size=batch, rank=r, size=P, seed=3)
    x, y, M = mine.batch(1, 2)
    assert len(y) == np.subtract(*shard_bounds(batch, r, P)[::-1])
    model = CNN(seed=0)
    model.loss_and_grad(x, y, denom=1)
    comm.allreduce(model.grads)
    model.grads /= M
    whole = ShardedLoader(split, batch_size=batch, rank=0, size=1, seed=3)
    xw, yw, Mw = whole.batch(1, 2)
    ref = CNN(seed=0)
    ref.loss_and_grad(xw, yw)                     # the mean over the whole global batch
    assert M == Mw == batch
    np.testing.assert_allclose(model.grads, ref.grads, rtol=2e-4, atol=2e-6)
    split.close()


def test_training_keeps_parameters_identical_on_every_rank(comm, tiny, mpi_tmp_path):
    """A whole run; train() ends with check_in_sync, which raises if any rank's parameters differ."""
    out = mpi_tmp_path / "run"
    cfg = Config(data=tiny, out=out, epochs=2, batch_size=20, threads=1, progress=False, check_every=7, val_size=0,
                 resume="none")
    assert train(cfg, comm) == 0
    if comm.is_root:
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert records[-1]["step"] == 2 * (384 // 20) and records[-1]["world_size"] == comm.size


def test_parameter_drift_is_detected(comm):
    step = TrainStep(ModelSpec(), comm, seed=comm.rank)      # the broadcast overrides each rank's seed
    check_in_sync(comm, step.model.params, 0)
    assert len(set(comm.allgather_obj(digest(step.model.params)))) == 1
    if comm.rank == comm.size - 1:
        step.model.params[123] += 1e-6                       # one rank drifts a little
    with pytest.raises(RuntimeError, match=f"ranks \\[{comm.size - 1}\\] differ"):
        check_in_sync(comm, step.model.params, 5)
