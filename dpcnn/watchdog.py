"""Stop requests and the stall watchdog: a job ends cleanly, or at least promptly, never hangs.

``StopRequest``: SIGTERM, SIGUSR1 and SIGINT (Ctrl-C, which mpiexec forwards to every rank)
set a flag that the ranks agree on at the next step boundary (the step's buffer carries it),
so they stop together and rank 0 writes a checkpoint. A second signal exits at once (one within
a second of the first is the same request, delivered twice by a launcher).

``Watchdog``: a thread on every rank, because the main thread cannot help itself when it is
blocked inside MPI (a Python signal handler only runs between bytecodes):

* stall: when the training has made no progress (a step, or a collective finishing) for
  ``timeout`` seconds, it logs one line naming the step and the collective it waits in and
  aborts the whole job with status 69 (like PyTorch's collective timeout or Horovod's stall
  check). A stopped, swapped-out or cut-off rank, or a dead node, ends the job this way.
* stop signal while stuck: a signal wakes the thread (``signal.set_wakeup_fd``); if the main
  thread is still in the same collective ``grace`` seconds later, no checkpoint is possible,
  so it logs one line and aborts with status 75 at once, instead of waiting for the
  scheduler's SIGKILL; the newest checkpoint stands and a requeued job resumes from it.

``watched(comm, dog)`` is the communicator the trainer uses: each collective tells the dog
what this rank waits in. Nothing here imports mpi4py: aborting is ``comm.abort``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .cli import EXIT_STALLED, EXIT_STOPPED
from .comm import Comm
from .fileio import write_atomic

log = logging.getLogger("dpcnn")


# Signals this close together are one request: scancel under Slurm reaches a rank twice when
# hydra's mpiexec forwards the SIGTERM that slurmstepd also sent it directly.
SAME_SIGNAL_S = 1.0


class StopRequest:
    """The stop flag set by SIGTERM, SIGUSR1 or SIGINT; a second signal ends the process at once
    (status 128 + signal number), unless it comes within SAME_SIGNAL_S of the first."""

    SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGUSR1", "SIGINT") if hasattr(signal, n))

    def __init__(self):
        self.signum = 0
        self.at = 0.0                         # when the first signal came
        self._old: dict = {}

    def install(self) -> StopRequest:
        for s in self.SIGNALS:
            self._old[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()

    def __enter__(self) -> StopRequest:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def _handle(self, signum, frame):
        if self.signum and time.monotonic() - self.at < SAME_SIGNAL_S:
            return                            # the same request again: a launcher forwarding it (mpiexec under Slurm)
        if self.signum:
            os.write(2, f"second signal {signum}: exiting now without a checkpoint\n".encode())
            os._exit(128 + signum)
        self.signum, self.at = signum, time.monotonic()


class Watchdog:
    """Ends this rank's job when it stalls, or when a stop signal finds it stuck in a collective."""

    def __init__(self, comm: Comm, timeout: float, grace: float = 10.0):
        self.comm, self.timeout, self.grace = comm, timeout, grace
        self.step = 0                         # the step being trained (set by the trainer)
        self.where: str | None = None         # the collective the main thread is in, if any
        self.since = time.monotonic()         # when it entered it
        self.progress = time.monotonic()      # the last sign of progress
        self.armed = False                    # stall checks start with the training loop
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rfd = self._wfd = -1
        self.status_file: Path | None = None  # where an abort records its status (the run directory's exit-status)

    # -- called by the main thread ------------------------------------------------------

    def start(self) -> Watchdog:
        """Start the thread; take signal wake-ups (main thread only, after installing handlers)."""
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._wfd, False)
        try:
            signal.set_wakeup_fd(self._wfd, warn_on_full_buffer=False)
        except ValueError:                     # not the main thread: no wake-ups, stall checks only
            pass
        self._thread = threading.Thread(target=self._run, name="dpcnn-watchdog", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            os.write(self._wfd, b"\0")         # wake it
            self._thread.join(timeout=5)
            with contextlib.suppress(ValueError):
                signal.set_wakeup_fd(-1)
            os.close(self._rfd)
            os.close(self._wfd)
            self._thread = None

    def beat(self, step: int | None = None) -> None:
        """The training made progress (a step ended); step: the one trained next."""
        if step is not None:
            self.step = step
        self.progress = time.monotonic()

    @contextlib.contextmanager
    def waiting(self, what: str) -> Iterator[None]:
        self.where, self.since = what, time.monotonic()
        try:
            yield
        finally:
            self.where = None
            self.progress = time.monotonic()

    # -- the thread ---------------------------------------------------------------------

    def _run(self) -> None:
        tick = max(0.05, min(1.0, self.timeout / 20, self.grace / 5))
        signalled, signals = 0.0, 0            # when the last stop signal came, and how many
        while not self._stop.is_set():
            ready, _, _ = select.select([self._rfd], [], [], tick)
            if self._stop.is_set():
                return
            now = time.monotonic()
            if ready and any(os.read(self._rfd, 64)) and (not signals or now - signalled >= SAME_SIGNAL_S):
                signalled, signals = now, signals + 1
            where, since = self.where, self.since
            # a stop signal, and the main thread stuck in one collective since: it cannot act on it
            if signals and where is not None and (signals > 1 or now - max(signalled, since) >= self.grace):
                self._abort(EXIT_STOPPED, f"stop signal while waiting in {where} for {now - since:.0f} s "
                            f"(step {self.step}): no checkpoint is possible now, the newest one stands; "
                            f"ending the job with status {EXIT_STOPPED}")
            if self.armed and now - self.progress > self.timeout:
                what = f"waiting in {where} for {now - since:.0f} s" if where else "not in a collective"
                self._abort(EXIT_STALLED, f"step {self.step} made no progress for {self.timeout:g} s ({what}): "
                            f"another rank or node is stopped, dead or cut off; ending the job with status "
                            f"{EXIT_STALLED} (--timeout)")

    def _abort(self, code: int, message: str) -> None:
        prefix = f"rank {self.comm.rank}: " if self.comm.size > 1 else ""
        print(f"error: {prefix}{message}", file=sys.stderr, flush=True)
        record_status(self.status_file, code)  # srun may report another status: the ranks the abort killed
        self.comm.abort(code)                  # ends every rank of the job (MPI_Abort)
        os._exit(code)                         # in case the abort returned


class _Watched:
    """A Comm whose collectives tell the watchdog what this rank is waiting in."""

    COLLECTIVES = {"allreduce": "the allreduce", "bcast": "a broadcast", "bcast_obj": "a broadcast",
                   "allgather_obj": "an allgather", "barrier": "a barrier", "node_cpus": "a node-local allgather"}

    def __init__(self, comm: Comm, dog: Watchdog):
        self._comm, self._dog = comm, dog

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._comm, name)
        what = self.COLLECTIVES.get(name)
        if what is None:
            return attr

        def collective(*args, **kwargs):
            with self._dog.waiting(what):
                return attr(*args, **kwargs)
        return collective


def watched(comm: Comm, dog: Watchdog) -> Comm:
    return _Watched(comm, dog)


def record_status(path: Path | None, code: int) -> None:
    """Write the exit status this attempt chose to path (best effort): a launcher reports the worst
    of its ranks' statuses (srun: 137 for a rank killed by another's abort), a batch script reads this."""
    if path is None:
        return
    with contextlib.suppress(OSError):
        write_atomic(path, f"{code}\n")
