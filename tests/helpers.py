"""What many tests share: a short training on the tiny data set, and reading a run's results back.

Fixtures (data sets, launchers) live in conftest.py; plain functions live here, so no test
module imports another.
"""

import json
import time
from pathlib import Path

import numpy as np

from dpcnn import checkpoint as ckpt
from dpcnn.rundir import RunDir
from dpcnn.train import main

# 384 training samples / batch 32 = 12 steps per epoch (no validation split unless a test gives --val-size)
BASE = ["--batch-size", "32", "--lr", "0.05", "--no-progress", "-q", "--threads", "1", "--val-size", "0"]
TIMING_KEYS = ("images_per_second", "elapsed_seconds", "world_size", "time_data_s", "time_compute_s",
               "time_allreduce_s", "time_update_s", "time_eval_s")


def train(data, out, *extra, comm="serial") -> int:
    """`python -m dpcnn.train` in this process on `data` into `out`, with BASE and extra flags: the exit status."""
    return main(["--data", str(data), "--out", str(out), "--comm", comm, *BASE, *map(str, extra)])


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]


def records_without_timings(run_dir) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in metrics(run_dir)]


def final_state(run_dir) -> ckpt.State:
    return ckpt.load(RunDir(run_dir).checkpoints()[0])


def assert_same_state(a: ckpt.State, b: ckpt.State):
    assert (a.step, a.epoch, a.next_batch) == (b.step, b.epoch, b.next_batch)
    for name in a.params:
        assert np.array_equal(a.params[name], b.params[name]), name
        assert np.array_equal(a.velocity[name], b.velocity[name]), name


def job_args(data, out, *extra) -> list:
    """The arguments of `python` for a launched training job (run_job, mpiexec)."""
    return ["-m", "dpcnn.train", "--data", data, "--out", out, *BASE, *extra]


def records(run_dir) -> list[dict]:
    """The records of a run directory's metrics.jsonl, [] before there is one; a torn last line (a
    writer killed mid-write) is left out."""
    path = Path(run_dir, "metrics.jsonl")
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(s) for s in lines if s.strip().endswith("}")]


def rank_pids(launcher_pid: int) -> list[int]:
    """PIDs of the python processes below a launcher (mpiexec and its proxies)."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            kids.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(d.name))
    out, todo = [], [launcher_pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            todo.append(c)
            try:
                if "python" in Path(f"/proc/{c}/comm").read_text():
                    out.append(c)
            except OSError:
                pass
    return sorted(out)


def leftovers(d: Path) -> list[str]:
    """The temporaries (.NAME.<pid>@<host>.tmp|.part) anywhere below d."""
    return sorted(p.name for p in Path(d).rglob(".*") if p.suffix in (".tmp", ".part"))


def wait_for(cond, what: str, proc=None, timeout: float = 90) -> None:
    """Poll cond() until true; AssertionError after timeout s, or as soon as the launched proc ends."""
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the job ended first ({proc.returncode}): {proc.communicate()}")
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.05)
