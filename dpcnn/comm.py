"""The communicator: everything dpcnn does with MPI, behind one small interface.

``get_comm()`` returns a ``SerialComm`` for a plain ``python -m dpcnn.train`` and an
``MPIComm`` under ``mpirun``/``mpiexec``/``srun``. mpi4py is imported only inside
``MPIComm``, so a single process needs no MPI library, and the math never imports it.
Method names follow MPI: ``allreduce`` (in-place sum of a NumPy buffer), ``iallreduce`` (the same,
started now and finished by the returned ``Request``'s ``wait``), ``bcast``,
``bcast_obj``, ``allgather_obj``, ``barrier``, ``abort``; ``Comm`` is their abstract base, and
each communicator implements every one of them itself (a method it lacks is a TypeError when it
is made, never a collective that silently does nothing).

Beside them live the distributed helpers every command shares: ``on_root`` (rank 0 does a
job, every rank gets its result or its error as one ``SharedError``), ``check_in_sync``
(parameters identical on every rank) and ``check_same`` (every rank started alike).
What runs where (host names, CPUs, BLAS) is ``dpcnn.node``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, TypeVar

import numpy as np

from .cli import UserError, error_line
from .node import usable_cpus

T = TypeVar("T")

# Environment variables that MPI launchers set in every rank they start.
LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE",
                 "MPI_LOCALNRANKS", "HYDRA_CONTROL_FD", "PMI_FD", "MV2_COMM_WORLD_SIZE")
# ... and those among them that hold how many ranks it started (hydra/PMI, Open MPI, MVAPICH).
LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


class CommError(UserError):
    """A launch or communication problem with a one-line explanation."""


class LaunchError(CommError):
    """This process cannot take part in the launch it was started in (``--comm serial`` under a
    launcher of several ranks). The other ranks wait for it inside MPI_Init, so printing the error
    is not enough: ``end_launch`` joins the world and aborts it, ending every rank."""

    def end_launch(self, code: int) -> None:
        try:
            import mpi4py
            mpi4py.rc.threads = False              # only this thread, only to abort: no other call follows
            from mpi4py import MPI
        except ImportError:                        # the others cannot be ended from here
            return
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(code)


class SharedError(UserError):
    """An error every rank has learned about (from rank 0): all exit together, no abort needed."""


THREAD_LEVELS = ("single", "funneled", "serialized", "multiple")      # MPI_THREAD_SINGLE ... MULTIPLE


class Request(ABC):
    """A started collective (``Comm.iallreduce``): ``test`` lets it progress and says whether it is
    done; ``wait`` finishes it (every rank must wait on what it started, in the same order)."""

    @abstractmethod
    def test(self) -> bool: ...

    @abstractmethod
    def wait(self) -> None: ...


class DoneRequest(Request):
    """A collective that finished when it started (one process)."""

    def test(self) -> bool:
        return True

    def wait(self) -> None:
        pass


class MPIRequest(Request):
    """An mpi4py request; keeps the buffer alive until the collective is done."""

    def __init__(self, req: Any, buf: Any):
        self._req, self._buf = req, buf

    def test(self) -> bool:
        return bool(self._req.Test())

    def wait(self) -> None:
        self._req.Wait()


class Comm(ABC):
    """What dpcnn needs of a communicator (``SerialComm``, ``MPIComm``, the watchdog's wrapper).

    Every collective is abstract: each communicator implements it itself."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    num_nodes: int
    is_root: bool
    name: str
    thread_level: str           # the MPI thread support ("multiple": any thread may call MPI at any time)

    @abstractmethod
    def allreduce(self, buf: np.ndarray) -> None:
        """Sum buf over all ranks, in place."""

    @abstractmethod
    def iallreduce(self, buf: np.ndarray) -> Request:
        """Start summing buf over all ranks, in place (non-blocking); buf is the sum after the
        request's ``wait`` and must not be touched before it."""

    @abstractmethod
    def iallgather(self, send: np.ndarray, recv: np.ndarray) -> Request:
        """Start gathering every rank's send (all of one size) into recv (size * send.size, the
        ranks' blocks in rank order) on every rank (non-blocking); neither buffer may be touched
        before the request's ``wait``."""

    @abstractmethod
    def bcast(self, buf: np.ndarray, root: int = 0) -> None:
        """Copy root's buf into every rank's buf, in place."""

    @abstractmethod
    def bcast_obj(self, obj: Any, root: int = 0) -> Any:
        """Root's obj, on every rank (pickled)."""

    @abstractmethod
    def allgather_obj(self, obj: Any) -> list:
        """[rank 0's obj, rank 1's obj, ...] on every rank."""

    @abstractmethod
    def barrier(self) -> None: ...

    @abstractmethod
    def abort(self, code: int = 1) -> None:
        """End every rank of the job now with status code (any thread may call it)."""

    @abstractmethod
    def node_cpus(self) -> int:
        """CPUs usable by the ranks of this node together (collective over the node)."""

    @abstractmethod
    def versions(self) -> dict:
        """The MPI library, mpi4py and the thread level (none without MPI)."""

    def root_job(self, what: str) -> AbstractContextManager[None]:
        """Around a job rank 0 does alone while the others wait for its result (``on_root``);
        the watchdog's communicator tells the watchdog, so a stall names rank 0 and `what`."""
        return contextlib.nullcontext()


class SerialComm(Comm):
    """One process: every collective is the identity."""

    rank, size, local_rank, local_size, num_nodes = 0, 1, 0, 1, 1
    is_root = True
    name = "serial"
    thread_level = "multiple"                   # no MPI: abort (os._exit) works from any thread

    def allreduce(self, buf: np.ndarray) -> None:
        pass

    def iallreduce(self, buf: np.ndarray) -> Request:
        return DoneRequest()

    def iallgather(self, send: np.ndarray, recv: np.ndarray) -> Request:
        np.copyto(recv.reshape(send.shape), send)
        return DoneRequest()

    def bcast(self, buf: np.ndarray, root: int = 0) -> None:
        pass

    def bcast_obj(self, obj, root: int = 0):
        return obj

    def allgather_obj(self, obj) -> list:
        return [obj]

    def barrier(self) -> None:
        pass

    def abort(self, code: int = 1) -> None:
        os._exit(code)

    def node_cpus(self) -> int:
        return len(usable_cpus())

    def versions(self) -> dict:
        return {}


class MPIComm(Comm):
    """MPI.COMM_WORLD through mpi4py, with a shared-memory sub-communicator per node."""

    name = "mpi"

    def __init__(self):
        import mpi4py
        # The watchdog's thread calls MPI_Abort while the main thread may be blocked in a collective:
        # two threads inside MPI at once, which the standard allows only at MPI_THREAD_MULTIPLE.
        # (When MPI is already initialised, by the program or pytest-mpi, these settings do nothing
        # and thread_level records what it got.)
        mpi4py.rc.threads = True
        mpi4py.rc.thread_level = "multiple"
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.thread_level = THREAD_LEVELS[MPI.Query_thread()]
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.is_root = self.rank == 0
        self.node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = self.node.Get_rank(), self.node.Get_size()
        leaders = self.comm.allreduce(1 if self.local_rank == 0 else 0)
        self.num_nodes = int(leaders)

    def allreduce(self, buf: np.ndarray) -> None:
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)

    def iallreduce(self, buf: np.ndarray) -> Request:
        return MPIRequest(self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM), buf)

    def iallgather(self, send: np.ndarray, recv: np.ndarray) -> Request:
        # as bytes: the block may hold other types (float64 sums in a float32 block)
        return MPIRequest(self.comm.Iallgather(send.view(np.uint8), recv.view(np.uint8)), (send, recv))

    def bcast(self, buf: np.ndarray, root: int = 0) -> None:
        self.comm.Bcast(buf, root=root)

    def bcast_obj(self, obj, root: int = 0):
        return self.comm.bcast(obj, root=root)

    def allgather_obj(self, obj) -> list:
        return self.comm.allgather(obj)

    def barrier(self) -> None:
        self.comm.Barrier()

    def abort(self, code: int = 1) -> None:
        """End every rank of the job now (the launcher kills the others)."""
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(0.5)                        # let the launcher forward the last lines before the kill
        self.comm.Abort(code)

    def versions(self) -> dict:
        import mpi4py
        first = self.MPI.Get_library_version().split("\0")[0].splitlines()[0]     # Open MPI's ends in a NUL
        return {"mpi4py": mpi4py.__version__, "mpi": " ".join(first.split()),     # "MPICH Version: 5.0.2"
                "mpi_thread_level": self.thread_level}

    def node_cpus(self) -> int:
        """CPUs usable by the ranks of this node together: the union of their affinity masks."""
        cpus = set().union(*self.node.allgather(sorted(usable_cpus())))
        return len(cpus)


def launched_by_mpi() -> bool:
    """True when an MPI launcher (mpiexec, mpirun, srun with PMI) started this process."""
    return any(v in os.environ for v in LAUNCHER_VARS)


def slurm_step_tasks() -> int:
    """Tasks of the Slurm job step this process belongs to (1 outside srun)."""
    try:
        return int(os.environ.get("SLURM_STEP_NUM_TASKS", "1"))
    except ValueError:
        return 1


def launched_ranks() -> int:
    """How many processes the launcher that started this one started (1 without one)."""
    sizes = [slurm_step_tasks()]
    for v in LAUNCHER_SIZE_VARS:
        with contextlib.suppress(ValueError):
            sizes.append(int(os.environ.get(v, "1")))
    return max(sizes)


def get_comm(kind: str = "auto") -> Comm:
    """The communicator for this process: kind 'auto', 'mpi' or 'serial'.

    'auto' uses MPI when a launcher started the process or Slurm runs several
    tasks, and the serial communicator otherwise. Under srun without PMI every
    task would be a separate world of size 1, training its own model; that is
    detected and refused with the fix in the message. 'serial' under a launcher of
    several processes is refused too (LaunchError): this process would train alone
    while the others wait for it.
    """
    if kind not in ("auto", "mpi", "serial"):
        raise CommError(f"--comm must be auto, mpi or serial, got {kind!r}")
    tasks, ranks = slurm_step_tasks(), launched_ranks()
    if kind == "serial" and ranks > 1:
        raise LaunchError(f"--comm serial in a launch of {ranks} processes: this one would train alone while "
                          "the others wait for it; leave out --comm serial, or start one process")
    if kind == "serial" or (kind == "auto" and not launched_by_mpi() and tasks <= 1):
        return SerialComm()
    try:
        comm = MPIComm()
    except ImportError as e:
        raise CommError(f"MPI requested but mpi4py cannot be imported ({e}); "
                        "install it with: pip install mpi4py (and an MPI, e.g. pip install mpich)") from e
    if comm.size == 1 and tasks > 1:
        raise CommError(
            f"Slurm started {tasks} tasks but MPI sees a world of 1: each task would train its own "
            "model. Launch with 'srun --mpi=pmi2 ...' (pmix for Open MPI; or set MpiDefault), or use "
            "'mpiexec -n $SLURM_NTASKS ...' inside the allocation")
    return comm


# ----------------------------------------------------------------------------- distributed helpers


def on_root(comm: Comm, job: Callable[[], T], what: str | None = None) -> T:
    """Run job() on rank 0 while the others wait; every rank gets its result, or its error as a
    SharedError (so one message is printed and all ranks exit together). what: the job in words,
    for a stall message ("preparing the data"; default: "running" and the function's name)."""
    result: Any = None
    err: str | None = None
    with comm.root_job(what or f"running {job_name(job)}"):
        if comm.is_root:
            try:
                result = job()
            except UserError as e:
                err = error_line(e)
        result, err = comm.bcast_obj((result, err))
    if err:
        raise SharedError(err)
    return result


def job_name(job: Callable) -> str:
    """'ensure_data' for a function defined in ensure_data, 'RunDir.open' for that method."""
    parts = getattr(job, "__qualname__", repr(job)).split(".<locals>.")
    return parts[-2] if len(parts) > 1 else parts[0]


def digest(a: np.ndarray) -> str:
    """A short hash of an array's bytes: equal digests, equal bits."""
    return hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16).hexdigest()


def check_in_sync(comm: Comm, params: np.ndarray, step: int) -> None:
    """RuntimeError unless every rank holds bit-identical parameters (collective)."""
    digests = comm.allgather_obj(digest(params))
    if len(set(digests)) > 1:
        bad = [r for r, d in enumerate(digests) if d != digests[0]]
        raise RuntimeError(f"parameters differ across ranks at step {step} (ranks {bad} differ "
                           "from rank 0): stopping")


def check_same(comm: Comm, settings: dict, what: str = "settings") -> None:
    """SharedError on every rank unless every rank passed equal `settings` (collective)."""
    everyone = comm.allgather_obj(settings)
    differ = sorted({k for c in everyone for k in c.keys() | settings.keys() if c.get(k) != everyone[0].get(k)})
    if differ:
        ranks = [r for r, c in enumerate(everyone) if c != everyone[0]]
        raise SharedError(f"rank(s) {ranks} were started with other {what} than rank 0 (differing: "
                          f"{', '.join(differ)}); start every rank with the same command and data")
