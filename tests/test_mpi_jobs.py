"""Launched MPI jobs, under whichever MPI's mpiexec the tests find: never hang and one status per
run (issue 20 items 8-13: a rank stopped during the start-up or mid-run, a whole job suspended, a
slow final checkpoint, one rank of an MPMD launch with --comm serial), MPI initialised at the
thread level the watchdog needs (item 12), and --exact's bits on 2 ranks and 1 process.

CI runs this file under MPICH (the venv's) and under Open MPI (.venv-ompi). For another MPI, set
DPCNN_MPIEXEC to its mpiexec (default: the one beside this Python, or on PATH) and
DPCNN_MPIEXEC_ARGS to what it needs ("--allow-run-as-root --oversubscribe": Open MPI as root)."""

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import child_env, mpiexec
from helpers import BASE, assert_same_state, final_state, rank_pids, records_without_timings, wait_for

from dpcnn import checkpoint as ckpt
from dpcnn.cli import EXIT_ERROR, EXIT_STALLED, EXIT_STOPPED
from dpcnn.rundir import RunDir


def launcher() -> list[str]:
    """The mpiexec command: DPCNN_MPIEXEC (default: the one the tests find) and DPCNN_MPIEXEC_ARGS."""
    return [os.environ.get("DPCNN_MPIEXEC") or mpiexec(), *os.environ.get("DPCNN_MPIEXEC_ARGS", "").split()]


def train_args(tiny_h5, out, *extra) -> list[str]:
    return ["--data", str(tiny_h5), "--out", str(out), *BASE, *map(str, extra)]


def patched(patch: str, argv: list[str]) -> list[str]:
    """`python -c`: apply patch (Python source; `t` is dpcnn.train), then run the trainer with argv."""
    return [sys.executable, "-c", "import os, signal, sys, time\nimport dpcnn.train as t\n"
            + textwrap.dedent(patch) + f"\nsys.exit(t.main({argv!r}))\n"]


def launch(cmd: list[str], nprocs: int) -> subprocess.Popen:
    """cmd under mpiexec -n nprocs (nprocs 0: without a launcher), stdout and stderr piped."""
    if nprocs:
        cmd = [*launcher(), "-n", str(nprocs), *cmd]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())


@contextlib.contextmanager
def ended_on_exit(p: subprocess.Popen):
    """Kill the launcher and every rank (a stopped one too) on the way out, whatever happened."""
    try:
        yield p
    finally:
        for pid in rank_pids(p.pid) if p.poll() is None else []:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        p.kill()
        p.wait()


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


# ----------------------------------------------------------------------------- item 8: stalls during the start-up


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stopped", [0, 1])
def test_a_rank_stopped_during_the_start_up_ends_the_job_with_69(tiny_h5, tmp_path, stopped):
    """A rank stops itself (SIGSTOP) before the data check of the start-up: the watchdog watches
    the start-up's collectives too, so the job ends with 69 (it used to hang until killed).
    Waiting for rank 0's part of the start-up, the line names rank 0 and its job."""
    patch = f"""
        orig = t.ensure_data
        def ensure_data(cfg, comm):
            if comm.rank == {stopped}:
                os.kill(os.getpid(), signal.SIGSTOP)
            return orig(cfg, comm)
        t.ensure_data = ensure_data
        """
    with ended_on_exit(launch(patched(patch, train_args(tiny_h5, tmp_path / "run", "--timeout", 2)), 2)) as p:
        _, err = p.communicate(timeout=60)
    assert p.returncode == EXIT_STALLED, err
    lines = error_lines(err)
    assert lines and all(line.startswith(f"error: rank {1 - stopped}: the start-up made no progress for 2 s (waiting")
                         for line in lines), err
    if stopped == 0:
        assert " s for rank 0, checking the data): it is stopped, dead or cut off" in lines[0], err
    else:
        assert "another rank or node is stopped, dead or cut off" in lines[0], err


# ------------------------------------------------------------------- item 9: an MPMD launch with --comm serial


@pytest.mark.timeout(120)
def test_serial_comm_on_one_rank_of_a_launch_is_refused_at_once(tiny_h5, tmp_path):
    """mpiexec -n 1 dpcnn.train : -n 1 dpcnn.train --comm serial: the serial one would train alone
    while the other waits for it in MPI_Init (it hung silently); it refuses and ends the launch."""
    cmd = [sys.executable, "-m", "dpcnn.train", *train_args(tiny_h5, tmp_path / "run")]
    mpmd = [*launcher(), "-n", "1", *cmd, ":", "-n", "1", *cmd, "--comm", "serial"]
    t0 = time.monotonic()
    with ended_on_exit(subprocess.Popen(mpmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env=child_env())) as p:
        _, err = p.communicate(timeout=60)
    assert p.returncode == EXIT_ERROR and time.monotonic() - t0 < 50, err
    assert error_lines(err) == ["error: --comm serial in a launch of 2 processes: this one would train alone while "
                                "the others wait for it; leave out --comm serial, or start one process"], err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------- item 10: a suspended job


@pytest.mark.timeout(180)
@pytest.mark.parametrize("nprocs", [0, 2])
def test_a_job_suspended_longer_than_the_timeout_goes_on(tiny_h5, tmp_path, nprocs):
    """Ctrl-Z then fg, or Slurm's suspend: every rank is stopped for longer than --timeout, then
    continued. A process's own pause is no stall: the run finishes with 0 and blames nobody (it
    ended with 69 about one time in ten, blaming another rank even in a one-process run).
    Each step burns CPU time, so that after a pause the next step ends well after the watchdog's
    first look."""
    out = tmp_path / "run"
    patch = """
        import dpcnn.step as s
        orig = s.TrainStep.__call__
        def slow(self, *a, **k):
            t0 = time.process_time()
            while time.process_time() - t0 < 0.15:
                pass
            return orig(self, *a, **k)
        s.TrainStep.__call__ = slow
        """
    argv = train_args(tiny_h5, out, "--timeout", 2, "--max-steps", 36, "--eval-every", 4)
    with ended_on_exit(launch(patched(patch, argv), nprocs)) as p:
        wait_for(lambda: (out / "metrics.jsonl").is_file(), "a first record", p)
        pids = rank_pids(p.pid) if nprocs else [p.pid]
        assert len(pids) == max(nprocs, 1)
        for _ in range(2):
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            time.sleep(5)                                  # > --timeout and the waiting ranks' patience
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
            time.sleep(0.5)
        _, err = p.communicate(timeout=120)
    assert p.returncode == 0 and not error_lines(err), err
    assert (out / "exit-status").read_text() == "0\n"


# ----------------------------------------------------------------------------- item 11: a slow final checkpoint


@pytest.mark.timeout(120)
def test_a_slow_final_checkpoint_names_rank_0_and_gives_one_status(tiny_h5, tmp_path):
    """Rank 0's last checkpoint write takes longer than --timeout while rank 1 waits: one line,
    from rank 0, naming the write; 69 from the launcher and in exit-status alike (mpiexec said 69,
    exit-status 0, and rank 0's line blamed another rank)."""
    out = tmp_path / "run"
    patch = """
        from dpcnn.rundir import RunDir
        orig = RunDir.save_checkpoint
        def save(self, state, *a, **k):
            if state.step == 6:
                time.sleep(8)
            return orig(self, state, *a, **k)
        RunDir.save_checkpoint = save
        """
    with ended_on_exit(launch(patched(patch, train_args(tiny_h5, out, "--timeout", 2, "--max-steps", 6)), 2)) as p:
        _, err = p.communicate(timeout=60)
    assert p.returncode == EXIT_STALLED, err
    assert (out / "exit-status").read_text() == "69\n"
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("error: rank 0: step 6 made no progress for 2 s: it has been "
                                                   "writing a checkpoint for "), err
    assert "another rank" not in err


# ----------------------------------------------------------------------------- a rank stopped mid-run


@contextlib.contextmanager
def two_ranks_one_stopped(tiny_h5, out, timeout):
    """A 2-rank training whose last rank is SIGSTOPped once a checkpoint exists; yields
    (the launcher, the rank PIDs); everything is killed on the way out."""
    cmd = [sys.executable, "-m", "dpcnn.train",
           *train_args(tiny_h5, out, "--epochs", 400, "--eval-every", 4, "--timeout", timeout)]
    with ended_on_exit(launch(cmd, 2)) as p:
        wait_for(lambda: RunDir(out).checkpoints(), "a first checkpoint", p)
        pids = rank_pids(p.pid)
        assert len(pids) == 2
        os.kill(pids[-1], signal.SIGSTOP)                  # swapped out, or a debugger: no progress
        yield p, pids


@pytest.mark.timeout(120)
def test_a_stopped_rank_ends_the_job_with_the_stall_status(tiny_h5, tmp_path):
    out = tmp_path / "run"
    with two_ranks_one_stopped(tiny_h5, out, 3) as (p, _):
        t0 = time.monotonic()
        _, err = p.communicate(timeout=60)
    assert p.returncode == EXIT_STALLED, err
    assert time.monotonic() - t0 < 30, err
    lines = error_lines(err)
    assert lines and all(line.startswith("error: rank 0: step ") and "made no progress for 3 s (waiting in the "
                         "allreduce" in line and "another rank or node is stopped" in line for line in lines), err
    assert (out / "exit-status").read_text() == "69\n"
    assert ckpt.load(RunDir(out).checkpoints()[0]).step > 0                # what was saved stands


@pytest.mark.timeout(120)
def test_a_stop_signal_while_stuck_in_a_collective_ends_the_rank_at_once(tiny_h5, tmp_path):
    """The scheduler's SIGTERM reaches a rank blocked in the allreduce (its peer is stopped): a
    Python handler cannot run there, so the watchdog thread ends the job, status 75, within its
    grace of 10 s, instead of waiting for SIGKILL."""
    out = tmp_path / "run"
    with two_ranks_one_stopped(tiny_h5, out, 300) as (p, pids):
        time.sleep(1)
        t0 = time.monotonic()
        os.kill(pids[0], signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    assert p.returncode == EXIT_STOPPED, err
    assert time.monotonic() - t0 < 30, err                 # the grace (10 s) and a loaded machine's slack
    assert "error: rank 0: stop signal while waiting in the allreduce" in err, err
    assert (out / "exit-status").read_text() == f"{EXIT_STOPPED}\n"
    assert ckpt.load(RunDir(out).checkpoints()[0]).step > 0


# ----------------------------------------------------------------------------- item 12: MPI by the book


@pytest.mark.timeout(120)
def test_mpi_is_initialised_at_the_thread_level_the_watchdog_needs(tmp_path):
    """The watchdog's thread calls MPI_Abort while the main thread may be blocked in a collective:
    MPI_THREAD_MULTIPLE (it was MPI_THREAD_SINGLE)."""
    # Rank 0 prints every rank's line: two ranks printing at once can interleave mid-line.
    probe = ("from dpcnn.comm import MPIComm\nfrom mpi4py import MPI\nc = MPIComm()\n"
             "line = f\"{c.rank} {MPI.Query_thread() == MPI.THREAD_MULTIPLE} {c.thread_level} \"\n"
             "line += c.versions()['mpi_thread_level']\n"
             "lines = MPI.COMM_WORLD.gather(line)\n"
             "if c.rank == 0: print('\\n'.join(lines), flush=True)\n")
    with ended_on_exit(launch([sys.executable, "-c", probe], 2)) as p:
        out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert out.split("\n")[:2] == ["0 True multiple multiple", "1 True multiple multiple"], out


@pytest.mark.timeout(120)
def test_a_lower_thread_level_is_warned_about(tiny_h5, tmp_path):
    """A program that initialised MPI itself at a lower level gets one warning naming it."""
    script = ("import sys, mpi4py\nmpi4py.rc.thread_level = 'serialized'\nfrom mpi4py import MPI\nimport dpcnn\n"
              f"cfg = dpcnn.Config(data={str(tiny_h5)!r}, out={str(tmp_path / 'run')!r}, max_steps=1, "
              "batch_size=32, threads=1, progress=False)\nsys.exit(dpcnn.fit(cfg))\n")
    with ended_on_exit(launch([sys.executable, "-c", script], 2)) as p:
        _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert err.count("warning: MPI was initialised at thread level serialized, not MPI_THREAD_MULTIPLE") == 1, err


# ----------------------------------------------------------------------------- the same bits on 2 ranks


@pytest.mark.timeout(180)
def test_exact_on_two_ranks_gives_the_bits_of_one_process(tiny_h5, tmp_path):
    """--exact: 2 ranks of this MPI and one process without MPI end with identical parameters,
    momentum and records (batch 28 of micro-batches of 4: 4 and 3 a rank)."""
    args = ("--max-steps", 16, "--batch-size", 28, "--micro-batch", 4, "--eval-every", 8, "--exact")
    for nprocs in (0, 2):
        cmd = [sys.executable, "-m", "dpcnn.train", *train_args(tiny_h5, tmp_path / f"p{nprocs}", *args)]
        with ended_on_exit(launch(cmd, nprocs)) as p:
            _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert records_without_timings(tmp_path / "p2") == records_without_timings(tmp_path / "p0")
    assert_same_state(final_state(tmp_path / "p2"), final_state(tmp_path / "p0"))
