"""The stall watchdog's decisions, in this process (issue 20 items 8-15): what a stall is, whom its
line names, one status per run, and a process left as it was found. The jobs that show the same
end to end (a stopped rank, a suspended job, a slow checkpoint) are in test_mpi_jobs.py."""

import logging
import os
import signal
import threading
import time

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

import dpcnn
from dpcnn import comm as comm_module
from dpcnn.cli import EXIT_STALLED
from dpcnn.comm import Comm, LaunchError, MPIComm, SerialComm, get_comm, on_root
from dpcnn.watchdog import Watchdog, record_status, watched


class FakeComm(SerialComm):
    """A rank of a larger job, for the watchdog's judgement (no collective is ever called)."""

    def __init__(self, rank=0, size=2):
        self.rank, self.size, self.is_root = rank, size, rank == 0


def judged(dog: Watchdog, idle: float) -> str | None:
    """The line dog would end the job with after `idle` seconds without progress (None: none)."""
    said = []
    dog._abort = lambda code, message: said.append((code, message))
    now = time.monotonic()
    dog.progress = dog.since = dog.doing_since = now - idle
    dog._judge(now, 0, 0.0)
    assert all(code == EXIT_STALLED for code, _ in said)
    return said[0][1] if said else None


def test_a_rank_waiting_in_a_collective_gives_the_slow_rank_time_to_name_itself():
    dog = Watchdog(FakeComm(rank=1), timeout=3)
    dog.armed, dog.step, dog.where = True, 12, "the allreduce"
    assert judged(dog, 3.5) is None                          # past the timeout, within the patience
    line = judged(dog, 3 + dog.patience + 0.5)
    assert line.startswith("step 12 made no progress for 3 s (waiting in the allreduce for ")
    assert "another rank or node is stopped, dead or cut off; ending the job with status 69 (--timeout)" in line


def test_a_busy_rank_names_itself_and_what_it_does():
    dog = Watchdog(FakeComm(rank=0), timeout=3)
    dog.armed, dog.step = True, 40
    with dog.busy("writing a checkpoint"):
        assert judged(dog, 2) is None
        line = judged(dog, 3.5)
    assert line.startswith("step 40 made no progress for 3 s: it has been writing a checkpoint for ")
    assert "another rank" not in line


def test_a_stall_during_start_up_counts_and_names_rank_0s_job():
    """Before the training loop: stalls in the start-up's collectives count (they did not); a rank
    waiting for rank 0's part of the start-up names rank 0 and the job."""
    dog = Watchdog(FakeComm(rank=1), timeout=3)
    with dog.waiting_for("rank 0, preparing the data"), dog.waiting("a broadcast"):
        line = judged(dog, 3 + dog.patience + 0.5)
    assert line.startswith("the start-up made no progress for 3 s (waiting in a broadcast for ")
    assert "for rank 0, preparing the data): it is stopped, dead or cut off" in line


def test_a_one_process_run_never_blames_another_rank():
    dog = Watchdog(SerialComm(), timeout=3)
    dog.armed, dog.where = True, "the allreduce"             # as it is, for an instant, in each step
    line = judged(dog, 3.5)
    assert line and "another rank" not in line and "waiting" not in line


def test_the_watchdogs_own_suspension_restarts_the_stall_clock():
    """SIGCONT (the process was stopped and continued: Ctrl-Z and fg, Slurm's suspend) reaches
    the watchdog's thread, which then does not count the pause as a stall."""
    dog = Watchdog(SerialComm(), timeout=3)
    said = []
    dog._abort = lambda code, message: said.append(message)
    dog.start()
    try:
        dog.progress -= 100                                  # as after a long pause
        os.kill(os.getpid(), signal.SIGCONT)
        deadline = time.monotonic() + 10
        while not dog.suspensions and time.monotonic() < deadline:
            time.sleep(0.01)
        assert dog.suspensions == 1 and not said
        assert time.monotonic() - dog.progress < 5
    finally:
        dog.close()


# ----------------------------------------------------------------------------- one status per run


def test_the_first_status_chosen_is_never_replaced(tmp_path):
    """Every rank's watchdog may decide; the first one to write exit-status is the one writer, and
    rank 0's end-of-run status does not replace a stall's 69 (the launcher reports 69 too)."""
    path = tmp_path / "exit-status"
    record_status(path, EXIT_STALLED)                        # rank 1's watchdog
    record_status(path, EXIT_STALLED)                        # rank 2's, at the same time
    record_status(path, 0)                                   # rank 0, finishing in the abort's last second
    assert path.read_text() == "69\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exit-status"]      # no temporaries left


def test_only_rank_0_records_the_end_of_a_run(tmp_path):
    for rank in (1, 0):
        dog = Watchdog(FakeComm(rank=rank), timeout=3)
        dog.status_file = tmp_path / "exit-status"
        dog.finish(0)
        assert dog.status_file.exists() == (rank == 0)


def test_after_the_run_chose_its_status_the_watchdog_ends_nothing():
    dog = Watchdog(FakeComm(rank=1), timeout=3)
    ended = []
    dog.comm.abort = lambda code: ended.append(code)        # type: ignore[method-assign]
    dog.finish(0)
    dog._abort(EXIT_STALLED, "too late")
    assert ended == [] and dog.status == 0


# ----------------------------------------------------------------------------- the communicators


def test_every_communicator_implements_every_collective_itself():
    """A collective MPIComm forgot must be an error, not SerialComm's no-op inherited."""
    assert not issubclass(MPIComm, SerialComm)
    wrapper = type(watched(SerialComm(), Watchdog(SerialComm(), 3)))
    needed = Comm.__abstractmethods__
    assert {"allreduce", "bcast", "bcast_obj", "allgather_obj", "barrier", "abort"} <= needed
    for cls in (SerialComm, MPIComm, wrapper):
        assert needed <= set(vars(cls)), (cls, needed - set(vars(cls)))

    class Forgetful(Comm):                                   # no allreduce
        def bcast(self, buf, root=0): ...
        def bcast_obj(self, obj, root=0): ...
        def allgather_obj(self, obj): ...
        def barrier(self): ...
        def abort(self, code=1): ...
        def node_cpus(self): ...
        def versions(self): ...

    with pytest.raises(TypeError, match="allreduce"):
        Forgetful()


def test_serial_comm_in_a_launch_of_several_processes_is_refused(monkeypatch):
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        with monkeypatch.context() as m:
            m.setenv(var, "2")
            with pytest.raises(LaunchError, match=r"--comm serial in a launch of 2 processes: this one would "
                                                  r"train alone while the others wait for it"):
                get_comm("serial")
    monkeypatch.setenv("PMI_SIZE", "1")
    assert isinstance(get_comm("serial"), SerialComm)


def test_on_root_tells_the_watchdog_whose_job_is_waited_for():
    dog = Watchdog(SerialComm(), 3)
    seen = []
    assert on_root(watched(SerialComm(), dog), lambda: seen.append(dog.doing) or 7, "preparing the data") == 7
    assert seen == ["preparing the data"] and dog.doing is None

    def ensure_data():
        def check():
            return dog.doing
        return on_root(watched(SerialComm(), dog), check)
    assert ensure_data() == "running ensure_data"
    assert comm_module.job_name(SerialComm.barrier) == "SerialComm.barrier"


# ----------------------------------------------------------------------------- dpcnn.fit leaves the process as it was


def _fit(tiny_h5, out, **kw):
    cfg = dpcnn.Config(data=tiny_h5, out=out, max_steps=2, batch_size=32, threads=1, progress=False, comm="serial",
                       **kw)
    return dpcnn.fit(cfg)


def _blas_threads():
    return [i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"]


def test_fit_restores_signals_wakeup_fd_blas_threads_and_logging(tiny_h5, tmp_path):
    """An asyncio program has its own signal wake-up fd and handlers; fit must give them back,
    and the BLAS threads it limited, and remove the console logging it set up."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    def mine(signum, frame):
        pass
    old_fd = signal.set_wakeup_fd(w)
    old_term = signal.signal(signal.SIGTERM, mine)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        with threadpool_limits(2):
            before = _blas_threads()
            assert _fit(tiny_h5, tmp_path / "run") == 0
            assert _blas_threads() == before
        assert signal.set_wakeup_fd(old_fd) == w
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGCONT) == signal.SIG_DFL
        assert root.handlers == handlers and root.level == level
    finally:
        signal.set_wakeup_fd(old_fd)
        signal.signal(signal.SIGTERM, old_term)
        os.close(r)
        os.close(w)


def test_fit_from_a_thread_trains_without_signal_handling(tiny_h5, tmp_path, caplog):
    result = {}
    def run():
        try:
            result["code"] = _fit(tiny_h5, tmp_path / "run")
        except BaseException as e:                           # noqa: B036 - reported below
            result["error"] = e
    with caplog.at_level(logging.INFO, logger="dpcnn"):
        t = threading.Thread(target=run)
        t.start()
        t.join(timeout=120)
    assert result == {"code": 0}, result
    assert "not in the main thread: stop signals (SIGTERM, SIGUSR1, Ctrl-C) are left to the program" in caplog.text
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))
    assert np.all(np.isfinite(dpcnn.load(tmp_path / "run" / "best.h5").model.params))


def test_a_stopped_command_ignores_the_launchers_late_copies_of_its_stop_signal():
    """srun and slurmstepd both deliver scancel's SIGUSR1: a copy that arrives after the run has put
    its handlers back must not kill the rank by the signal (the batch script requeues on the
    status 75 it chose; CI saw a rank die so and the job hang). A signal after SAME_SIGNAL_S still
    ends the process, 128 + its number."""
    import subprocess
    import sys
    script = ("import os, signal, sys, time\nfrom dpcnn.watchdog import SAME_SIGNAL_S, ignore_echoes\n"
              "ignore_echoes()\nos.kill(os.getpid(), signal.SIGUSR1)\ntime.sleep(0.05)\n"
              "if sys.argv[1] == 'late':\n    time.sleep(SAME_SIGNAL_S + 0.1)\n"
              "    os.kill(os.getpid(), signal.SIGUSR1)\n    time.sleep(5)\nsys.exit(75)\n")
    assert subprocess.run([sys.executable, "-c", script, "echo"], timeout=60).returncode == 75
    assert subprocess.run([sys.executable, "-c", script, "late"], timeout=60).returncode == 128 + signal.SIGUSR1
