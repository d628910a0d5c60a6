"""What runs where: this node's host name and usable CPUs, the BLAS library and its threads, and
the mpiexec that starts ranks. Nothing here talks to other ranks (that is ``dpcnn.comm``).
"""

from __future__ import annotations

import os
import shutil
import socket
import sys


def hostname() -> str:
    return socket.gethostname()


def usable_cpus() -> set[int]:
    """The CPUs this process may run on (its affinity mask; every CPU where there is none)."""
    try:
        return os.sched_getaffinity(0)
    except AttributeError:                      # not Linux
        return set(range(os.cpu_count() or 1))


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


def find_mpiexec() -> str | None:
    """The mpiexec beside this Python (a venv with the mpich wheel) or on PATH."""
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    return shutil.which("mpiexec", path=path)
