"""The process set-up of a training, in one context manager that undoes all of it on the way out:
console logging, stop signals, the stall watchdog and BLAS threads.

    with training_process(comm, timeout=600, threads=1) as proc:
        proc.comm      # the communicator, watched: its collectives tell the watchdog where it waits
        proc.stop      # the stop request (SIGTERM, SIGUSR1, Ctrl-C)
        proc.dog       # the stall watchdog

Both ``python -m dpcnn.train`` and ``dpcnn.fit`` train inside it. From the main thread it
installs the stop-signal handlers and lets signals wake the watchdog; from another thread (a
program calling ``dpcnn.fit`` from a worker) Python allows neither, so the run goes without
them (said on one info line): the stall watchdog still ends a stalled job, but a SIGTERM is the
program's to handle.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from threadpoolctl import threadpool_limits

from .cli import setup_logging
from .comm import Comm
from .node import default_threads
from .watchdog import StopRequest, Watchdog, watched

log = logging.getLogger("dpcnn")

DEFAULT_TIMEOUT = 600.0      # for a timeout the Config check is about to refuse (config.py's default)


@dataclass
class Process:
    comm: Comm                # watched
    stop: StopRequest
    dog: Watchdog
    threads: int              # BLAS threads of this process


@contextlib.contextmanager
def console_logging(rank: int) -> Iterator[None]:
    """The command's console lines on stderr (rank 0 at INFO, the others warnings) when the
    program has set up no logging; removed again on the way out."""
    root = logging.getLogger()
    if root.handlers:
        yield
        return
    level = root.level
    setup_logging(rank=rank)
    ours = list(root.handlers)
    try:
        yield
    finally:
        for h in ours:
            root.removeHandler(h)
        root.setLevel(level)


@contextlib.contextmanager
def training_process(comm: Comm, timeout: float | None = None, threads: int | None = None) -> Iterator[Process]:
    """Set up this process for training on comm; everything it changed is restored on exit.

    timeout: the watchdog's --timeout; threads: BLAS threads (None: default_threads()). Values a
    Config check would refuse are replaced by the defaults, so that the check itself, a
    collective, runs watched."""
    if not (isinstance(timeout, (int, float)) and 0 < timeout < math.inf):
        timeout = DEFAULT_TIMEOUT
    n = threads if isinstance(threads, int) and threads > 0 else default_threads()
    with contextlib.ExitStack() as undo:
        undo.enter_context(console_logging(comm.rank))
        main = threading.current_thread() is threading.main_thread()
        stop = StopRequest()
        if main:
            undo.enter_context(stop)                       # first: a signal during a long start-up is not lost
        else:
            log.info("not in the main thread: stop signals (SIGTERM, SIGUSR1, Ctrl-C) are left to the program; "
                     "the stall watchdog runs without them")
        dog = Watchdog(comm, timeout).start(signals=main)
        undo.callback(dog.close)
        undo.enter_context(threadpool_limits(n))          # BLAS threads of this process until the end
        if comm.size > 1 and comm.thread_level != "multiple" and comm.is_root:
            log.warning("warning: MPI was initialised at thread level %s, not MPI_THREAD_MULTIPLE: the stall "
                        "watchdog's MPI_Abort from its own thread is then outside the MPI standard and may not end "
                        "a stalled job (Cray MPICH: export MPICH_MAX_THREAD_SAFETY=multiple)", comm.thread_level)
        yield Process(watched(comm, dog), stop, dog, n)
