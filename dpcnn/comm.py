"""The communicator: everything dpcnn does with MPI, behind one small interface.

``get_comm()`` returns a ``SerialComm`` for a plain ``python -m dpcnn.train`` and an
``MPIComm`` under ``mpirun``/``mpiexec``/``srun``. mpi4py is imported only inside
``MPIComm``, so a single process needs no MPI library, and the math never imports it.
Method names follow MPI: ``allreduce`` (in-place sum of a NumPy buffer), ``bcast``,
``bcast_obj``, ``allgather_obj``, ``barrier``, ``abort``; ``Comm`` is their protocol type.

Beside them live the distributed helpers every command shares: ``on_root`` (rank 0 does a
job, every rank gets its result or its error as one ``SharedError``), ``check_in_sync``
(parameters identical on every rank) and ``find_mpiexec``.

This module also knows the node: how many ranks share it (an MPI shared-memory split)
and how many CPUs they may use, so that an oversubscribed node is warned about.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import numpy as np

from .cli import UserError, error_line

T = TypeVar("T")

# Environment variables that MPI launchers set in every rank they start.
LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE",
                 "MPI_LOCALNRANKS", "HYDRA_CONTROL_FD", "PMI_FD", "MV2_COMM_WORLD_SIZE")


class CommError(UserError):
    """A launch or communication problem with a one-line explanation."""


class SharedError(UserError):
    """An error every rank has learned about (from rank 0): all exit together, no abort needed."""


class Comm(Protocol):
    """What dpcnn needs of a communicator (``SerialComm``, ``MPIComm``)."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    num_nodes: int
    is_root: bool
    name: str

    def allreduce(self, buf: np.ndarray) -> None: ...
    def bcast(self, buf: np.ndarray, root: int = 0) -> None: ...
    def bcast_obj(self, obj: Any, root: int = 0) -> Any: ...
    def allgather_obj(self, obj: Any) -> list: ...
    def barrier(self) -> None: ...
    def abort(self, code: int = 1) -> None: ...
    def node_cpus(self) -> int: ...
    def versions(self) -> dict: ...


class SerialComm:
    """One process: every collective is the identity."""

    rank, size, local_rank, local_size, num_nodes = 0, 1, 0, 1, 1
    is_root = True
    name = "serial"

    def allreduce(self, buf: np.ndarray) -> None:
        """Sum buf over all ranks, in place."""

    def bcast(self, buf: np.ndarray, root: int = 0) -> None:
        """Copy root's buf into every rank's buf, in place."""

    def bcast_obj(self, obj, root: int = 0):
        return obj

    def allgather_obj(self, obj) -> list:
        return [obj]

    def barrier(self) -> None:
        pass

    def abort(self, code: int = 1) -> None:
        os._exit(code)

    def node_cpus(self) -> int:
        return len(_affinity())

    def versions(self) -> dict:
        """The MPI library and mpi4py versions (none without MPI)."""
        return {}


class MPIComm(SerialComm):
    """MPI.COMM_WORLD through mpi4py, with a shared-memory sub-communicator per node."""

    name = "mpi"

    def __init__(self):
        import mpi4py
        mpi4py.rc.threads = False              # no MPI_Init_thread(MULTIPLE): cheaper, enough here
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.is_root = self.rank == 0
        self.node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = self.node.Get_rank(), self.node.Get_size()
        leaders = self.comm.allreduce(1 if self.local_rank == 0 else 0)
        self.num_nodes = int(leaders)

    def allreduce(self, buf: np.ndarray) -> None:
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)

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
        first = self.MPI.Get_library_version().splitlines()[0]
        return {"mpi4py": mpi4py.__version__, "mpi": " ".join(first.split())}     # "MPICH Version: 5.0.2"

    def node_cpus(self) -> int:
        """CPUs usable by the ranks of this node together: the union of their affinity masks.

        Collective over the node's ranks."""
        cpus = set().union(*self.node.allgather(sorted(_affinity())))
        return len(cpus)


def _affinity() -> set[int]:
    try:
        return os.sched_getaffinity(0)
    except AttributeError:                      # not Linux
        return set(range(os.cpu_count() or 1))


def launched_by_mpi() -> bool:
    """True when an MPI launcher (mpiexec, mpirun, srun with PMI) started this process."""
    return any(v in os.environ for v in LAUNCHER_VARS)


def slurm_step_tasks() -> int:
    """Tasks of the Slurm job step this process belongs to (1 outside srun)."""
    try:
        return int(os.environ.get("SLURM_STEP_NUM_TASKS", "1"))
    except ValueError:
        return 1


def get_comm(kind: str = "auto") -> SerialComm:
    """The communicator for this process: kind 'auto', 'mpi' or 'serial'.

    'auto' uses MPI when a launcher started the process or Slurm runs several
    tasks, and the serial communicator otherwise. Under srun without PMI every
    task would be a separate world of size 1, training its own model; that is
    detected and refused with the fix in the message.
    """
    if kind not in ("auto", "mpi", "serial"):
        raise CommError(f"--comm must be auto, mpi or serial, got {kind!r}")
    tasks = slurm_step_tasks()
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
            "model. Launch with 'srun --mpi=pmi2 ...' (or set MpiDefault=pmi2), or use "
            "'mpiexec -n $SLURM_NTASKS ...' inside the allocation")
    return comm


def default_threads() -> int:
    """BLAS threads for this rank when --threads is not given: SLURM_CPUS_PER_TASK when set (what
    the scheduler gave each task), else 1.

    One, not the node's cores shared among its ranks: BLAS threads change float32 rounding, so
    a default that depended on the rank count would give other bits on other rank counts;
    ranks use cores better than threads (which speed up only the matrix products); and a
    thread-per-core default collapses when another program holds a core."""
    per_task = os.environ.get("SLURM_CPUS_PER_TASK")
    if per_task and per_task.isdigit() and int(per_task) > 0:
        return int(per_task)
    return 1


def blas_summary() -> str:
    """The BLAS libraries NumPy uses, as threadpoolctl sees them: 'openblas 0.3.31 (Haswell)'."""
    from threadpoolctl import threadpool_info

    info = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    return ", ".join(f"{i['internal_api']} {i.get('version')} ({i.get('architecture')})" for i in info) or "unknown"


def hostname() -> str:
    return socket.gethostname()


def find_mpiexec() -> str | None:
    """The mpiexec beside this Python (a venv with the mpich wheel) or on PATH."""
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    return shutil.which("mpiexec", path=path)


# ----------------------------------------------------------------------------- distributed helpers


def on_root(comm: Comm, job: Callable[[], T]) -> T:
    """Run job() on rank 0 while the others wait; every rank gets its result, or its error as a
    SharedError (so one message is printed and all ranks exit together)."""
    result: Any = None
    err: str | None = None
    if comm.is_root:
        try:
            result = job()
        except UserError as e:
            err = error_line(e)
    result, err = comm.bcast_obj((result, err))
    if err:
        raise SharedError(err)
    return result


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
