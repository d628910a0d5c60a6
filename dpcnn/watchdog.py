"""Stop requests and the stall watchdog: a job ends cleanly, or at least promptly, never hangs.

``StopRequest``: SIGTERM, SIGUSR1 and SIGINT (Ctrl-C, which mpiexec forwards to every rank)
set a flag that the ranks agree on at the next step boundary (the step's buffer carries it),
so they stop together and rank 0 writes a checkpoint. A second signal exits at once (one within
a second of the first is the same request, delivered twice by a launcher).

``Watchdog``: a thread on every rank, from the first collective of the start-up to the end of
the run, because the main thread cannot help itself when it is blocked inside MPI (a Python
signal handler only runs between bytecodes):

* stall: when this rank has made no progress (a step, or a collective finishing) for
  ``timeout`` seconds, it logs one line and aborts the whole job with status 69 (like
  PyTorch's collective timeout or Horovod's stall check). The line says what this rank was
  doing: a rank busy on its own (``busy("writing a checkpoint")``, or rank 0's part of the
  start-up) names itself and the job; a rank waiting in a collective blames the others, but
  only ``patience`` seconds later, so that the slow rank, if it is alive, speaks first. A
  stopped, swapped-out or cut-off rank, or a dead node, ends the job this way.
* its own suspension is not a stall: a process stopped and continued as a whole (Ctrl-Z and
  ``fg``, Slurm's suspend) gets SIGCONT, which wakes the thread, and the stall clock restarts.
* stop signal while stuck: a signal wakes the thread (``signal.set_wakeup_fd``); if the main
  thread is still in the same collective ``grace`` seconds later, no checkpoint is possible,
  so it logs one line and aborts with status 75 at once, instead of waiting for the
  scheduler's SIGKILL; the newest checkpoint stands and a requeued job resumes from it.

One status per attempt: the first to choose it (the watchdog's abort, or ``finish`` at the end
of the run) wins, and is the only one written to the run directory's ``exit-status``.

``watched(comm, dog)`` is the communicator the trainer uses: each collective tells the dog
what this rank waits in. Nothing here imports mpi4py: aborting is ``comm.abort``, which the
watchdog's thread may call because ``MPIComm`` initialises MPI at MPI_THREAD_MULTIPLE.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np

from .cli import EXIT_STALLED, EXIT_STOPPED
from .comm import Comm, Request
from .fileio import WriteError, temp_name, write_atomic

# Signals this close together are one request: scancel under Slurm reaches a rank twice when
# hydra's mpiexec forwards the SIGTERM that slurmstepd also sent it directly.
SAME_SIGNAL_S = 1.0
SIGCONT = getattr(signal, "SIGCONT", None)


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


def ignore_echoes() -> None:
    """For the rest of a command that a stop signal ended: ignore the launcher's late copies of
    that signal (srun and slurmstepd both deliver scancel's; hydra forwards Slurm's), which would
    otherwise reach the default action once the run has put its handlers back and kill the rank
    by the signal, not with the status it chose (75, which the batch script requeues on; a rank
    killed so can also leave the others waiting in MPI_Finalize). A later signal, beyond
    SAME_SIGNAL_S, still ends the process (128 + the signal number). Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        return
    since = time.monotonic()

    def handle(signum, frame):
        if time.monotonic() - since >= SAME_SIGNAL_S:
            os._exit(128 + signum)

    for s in StopRequest.SIGNALS:
        signal.signal(s, handle)


def _continued(signum, frame) -> None:
    """SIGCONT's handler: nothing to do in Python; having one makes SIGCONT reach the wake-up fd."""


class Watchdog:
    """Ends this rank's job when it stalls, or when a stop signal finds it stuck in a collective."""

    def __init__(self, comm: Comm, timeout: float, grace: float = 10.0):
        self.comm, self.timeout, self.grace = comm, timeout, grace
        # A rank waiting in a collective gives the rank it waits for this much longer than the
        # timeout, so that a rank that is slow but alive (writing a checkpoint) names itself first:
        # more than a tick of its watchdog and its abort's delay.
        self.patience = min(max(timeout / 2, 2.0), 5.0)
        self.step = 0                         # the step being trained (set by the trainer)
        self.armed = False                    # the training loop runs (set by the trainer): stalls name the step
        self.where: str | None = None         # the collective the main thread is in, if any
        self.since = time.monotonic()         # when it entered it
        self.doing: str | None = None         # what this rank does alone, if busy(): "writing a checkpoint"
        self.doing_since = time.monotonic()
        self.behind: str | None = None        # the job of rank 0 this rank waits for (on_root), if any
        self.progress = time.monotonic()      # the last sign of progress
        self.suspensions = 0                  # how often this process was found stopped and continued
        self.status_file: Path | None = None  # where the chosen status is recorded (the run directory's exit-status)
        self.status: int | None = None        # the status this attempt chose, once chosen (finish or an abort)
        self._aborting = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rfd = self._wfd = -1
        self._signals = False                 # whether signals wake the thread (main thread only)
        self._old_wakeup_fd = -1
        self._old_sigcont: Any = None

    # -- called by the main thread ------------------------------------------------------

    def start(self, signals: bool = True) -> Watchdog:
        """Start the thread. signals (the main thread only, after installing the stop handlers):
        stop signals and SIGCONT wake it; close() puts back the wake-up fd and SIGCONT's handler."""
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        if signals:
            if SIGCONT is not None:
                self._old_sigcont = signal.signal(SIGCONT, _continued)
                signal.siginterrupt(SIGCONT, False)     # restart the system calls it interrupts (inside MPI too)
            self._old_wakeup_fd = signal.set_wakeup_fd(self._wfd, warn_on_full_buffer=False)
            self._signals = True
        self._thread = threading.Thread(target=self._run, name="dpcnn-watchdog", daemon=True)
        self._thread.start()
        return self

    def finish(self, code: int) -> None:
        """The run ends with status `code` (0, 75): rank 0 records it, and stalls no longer count.
        If the watchdog has chosen another status already, wait for its abort to end this process."""
        if not self._choose(code):
            self._wait_for_abort()
        if self.comm.is_root:
            record_status(self.status_file, code)

    def close(self) -> None:
        """Stop the thread (or, if it is ending the job, wait for that) and put back what start() changed."""
        if self._thread is None:
            return
        if not self._choose(-1):
            self._wait_for_abort()
        self._stop.set()
        with contextlib.suppress(OSError):
            os.write(self._wfd, b"\0")          # wake it
        self._thread.join(timeout=5)
        self._thread = None
        if self._signals:
            with contextlib.suppress(ValueError):
                signal.set_wakeup_fd(self._old_wakeup_fd)
            if SIGCONT is not None:
                signal.signal(SIGCONT, self._old_sigcont)
            self._signals = False
        os.close(self._rfd)
        os.close(self._wfd)

    def beat(self, step: int | None = None) -> None:
        """The training made progress (a step ended); step: the one trained next."""
        if step is not None:
            self.step = step
        self.progress = time.monotonic()

    @contextlib.contextmanager
    def waiting(self, what: str) -> Iterator[None]:
        """Around a collective: this rank waits in `what` ("the allreduce") for the others."""
        self.since = time.monotonic()
        self.where = what
        try:
            yield
        finally:
            self.where = None
            self.progress = time.monotonic()

    @contextlib.contextmanager
    def busy(self, what: str) -> Iterator[None]:
        """Around work this rank does alone while others may wait for it; `what` completes
        "it has been ... for 12 s" in a stall message: "writing a checkpoint"."""
        outer = self.doing, self.doing_since
        self.doing_since = time.monotonic()
        self.doing = what
        try:
            yield
        finally:
            self.doing, self.doing_since = outer
            self.progress = time.monotonic()

    @contextlib.contextmanager
    def waiting_for(self, whom: str) -> Iterator[None]:
        """Around waiting for one known rank's job ("rank 0, running ensure_data"): a stall names it."""
        self.behind = whom
        try:
            yield
        finally:
            self.behind = None

    # -- the thread ---------------------------------------------------------------------

    def _run(self) -> None:
        tick = max(0.05, min(1.0, self.timeout / 20, self.grace / 5))
        late = tick + max(tick, 0.25)          # a wake-up this late: suspended, or starved of the CPU or GIL
        signalled, signals = 0.0, 0            # when the last stop signal came, and how many
        last = time.monotonic()
        hold = 0.0                             # judge nothing before: a late wake-up's SIGCONT may be on its way
        while not self._stop.is_set():
            ready, _, _ = select.select([self._rfd], [], [], tick)
            if self._stop.is_set():
                return
            now = time.monotonic()
            got = b""
            if ready:
                with contextlib.suppress(BlockingIOError):
                    got = os.read(self._rfd, 512)
            gap, last = now - last, now
            if any(b in StopRequest.SIGNALS for b in got) and (not signals or now - signalled >= SAME_SIGNAL_S):
                signalled, signals = now, signals + 1
            if SIGCONT is not None and SIGCONT in got:
                self._continued(now)           # this process was stopped: its own pause is no stall
            elif gap > late:
                if not self._signals:          # no SIGCONT to tell: take any late wake-up for a pause
                    self._continued(now)
                elif now >= hold + 2 * late:   # (not straight after the last hold: a starved thread still judges)
                    hold = now + max(1.0, 2 * tick)
            if now >= hold:
                self._judge(now, signals, signalled)

    def _continued(self, now: float) -> None:
        self.suspensions += 1
        self.progress = max(self.progress, now)

    def _judge(self, now: float, signals: int, signalled: float) -> None:
        where, since, doing, behind = self.where, self.since, self.doing, self.behind
        at = f"step {self.step}" if self.armed else "the start-up"
        # a stop signal, and the main thread stuck in one collective since: it cannot act on it
        if signals and where is not None and (signals > 1 or now - max(signalled, since) >= self.grace):
            self._abort(EXIT_STOPPED, f"stop signal while waiting in {where} for {now - since:.0f} s ({at}): "
                        f"no checkpoint is possible now, the newest one stands; ending the job with status "
                        f"{EXIT_STOPPED}")
        idle = now - self.progress
        stalled = f"{at} made no progress for {self.timeout:g} s"
        end = f"ending the job with status {EXIT_STALLED} (--timeout)"
        if where is not None and self.comm.size > 1:
            if idle > self.timeout + self.patience:
                whom = (f" for {behind}): it is" if behind else "): another rank or node is")
                self._abort(EXIT_STALLED, f"{stalled} (waiting in {where} for {now - since:.0f} s{whom} stopped, "
                            f"dead or cut off; {end}")
        elif idle > self.timeout:
            if doing is not None:
                self._abort(EXIT_STALLED, f"{stalled}: it has been {doing} for {now - self.doing_since:.0f} s; {end}")
            elif self.comm.size > 1:
                self._abort(EXIT_STALLED, f"{stalled} (computing, not in a collective): this rank is too slow "
                            f"or stuck; {end}")
            else:
                self._abort(EXIT_STALLED, f"{stalled} (computing): this process is too slow or stuck; {end}")

    def _choose(self, code: int) -> bool:
        """Take this attempt's status, unless one is taken (-1: closed without one, after an
        error); False when the watchdog is ending the job with its own."""
        with self._lock:
            if self._aborting:
                return False
            if self.status is None:
                self.status = code
            return True

    def _wait_for_abort(self) -> None:
        if self._aborting and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()                # the abort ends this process

    def _abort(self, code: int, message: str) -> None:
        with self._lock:
            if self.status is not None:        # the run has chosen its status: nothing to end
                return
            self.status, self._aborting = code, True
        prefix = f"rank {self.comm.rank}: " if self.comm.size > 1 else ""
        print(f"error: {prefix}{message}", file=sys.stderr, flush=True)
        record_status(self.status_file, code)  # srun may report another status: the ranks the abort killed
        self.comm.abort(code)                  # ends every rank of the job (MPI_Abort)
        os._exit(code)                         # in case the abort returned


class _Watched(Comm):
    """A Comm whose collectives tell the watchdog what this rank is waiting in."""

    def __init__(self, comm: Comm, dog: Watchdog):
        self._comm, self._dog = comm, dog
        self.rank, self.size, self.is_root, self.name = comm.rank, comm.size, comm.is_root, comm.name
        self.local_rank, self.local_size, self.num_nodes = comm.local_rank, comm.local_size, comm.num_nodes
        self.thread_level = comm.thread_level

    def allreduce(self, buf: np.ndarray) -> None:
        with self._dog.waiting("the allreduce"):
            self._comm.allreduce(buf)

    def iallreduce(self, buf: np.ndarray) -> Request:
        return _WatchedRequest(self._comm.iallreduce(buf), self._dog)

    def iallgather(self, send: np.ndarray, recv: np.ndarray) -> Request:
        return _WatchedRequest(self._comm.iallgather(send, recv), self._dog, "the allgather")

    def bcast(self, buf: np.ndarray, root: int = 0) -> None:
        with self._dog.waiting("a broadcast"):
            self._comm.bcast(buf, root)

    def bcast_obj(self, obj: Any, root: int = 0) -> Any:
        with self._dog.waiting("a broadcast"):
            return self._comm.bcast_obj(obj, root)

    def allgather_obj(self, obj: Any) -> list:
        with self._dog.waiting("an allgather"):
            return self._comm.allgather_obj(obj)

    def barrier(self) -> None:
        with self._dog.waiting("a barrier"):
            self._comm.barrier()

    def node_cpus(self) -> int:
        with self._dog.waiting("a node-local allgather"):
            return self._comm.node_cpus()

    def abort(self, code: int = 1) -> None:
        self._comm.abort(code)

    def versions(self) -> dict:
        return self._comm.versions()

    def root_job(self, what: str) -> AbstractContextManager[None]:
        if self.size == 1 or self.is_root:
            return self._dog.busy(what)
        return self._dog.waiting_for(f"rank 0, {what}")


class _WatchedRequest(Request):
    """A started collective: its wait is a collective this rank waits in (a test returns at once)."""

    def __init__(self, req: Request, dog: Watchdog, what: str = "the allreduce"):
        self._req, self._dog, self._what = req, dog, what

    def test(self) -> bool:
        return self._req.test()

    def wait(self) -> None:
        with self._dog.waiting(self._what):
            self._req.wait()


def watched(comm: Comm, dog: Watchdog) -> Comm:
    return _Watched(comm, dog)


def record_status(path: Path | None, code: int) -> None:
    """Write the exit status this attempt chose to path, unless a status is there already: the
    first rank to choose one (the watchdog's abort, or rank 0 at the end) is the one writer, and
    its status is never replaced. Best effort. A launcher reports the worst of its ranks'
    statuses (srun: 137 for a rank killed by another's abort); a batch script reads this."""
    if path is None:
        return
    tmp = temp_name(path)
    try:
        with open(tmp, "w") as fh:
            fh.write(f"{code}\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, path)                     # atomic, and fails if the file exists (NFS too)
    except FileExistsError:
        pass
    except OSError:                            # no hard links here (some network file systems)
        with contextlib.suppress(OSError, WriteError):
            if not path.exists():
                write_atomic(path, f"{code}\n")
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
