"""The benchmark commands run and report what the README says they report (no timing asserted)."""

import json
import time

import numpy as np
import pytest
from conftest import mpiexec, run_job

from dpcnn import bench
from dpcnn.model import ModelSpec
from dpcnn.scaling import efficiency, summarise


def test_bench_json_fields(capsys):
    assert bench.main(["--batch-size", "8", "--steps", "2", "--rounds", "1", "--no-torch", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["batch_size"] == 8 and r["threads"] == 1 and r["num_params"] == ModelSpec().num_params == 103018
    assert r["images_per_second"] > 0 and r["peak_memory_mb"] > 0 and "torch_images_per_second" not in r


def test_bench_profile_accounts_for_the_step():
    rows = dict(bench.profile(batch_size=8, threads=1, steps=3))
    assert {"im2col", "conv_backward", "maxpool_forward", "softmax_cross_entropy"} <= set(rows)
    # own times exclude nested calls (im2col inside conv_forward...): counted twice, the layer
    # functions would add up to more than the step, leaving "everything else" negative
    rest = rows.pop("everything else (model glue, SGD update)")
    assert 0 <= rest < rows.pop("total") and all(ms > 0 for ms in rows.values())


@pytest.mark.timeout(120)
def test_scaling_reports_efficiency_and_allreduce_split():
    mpiexec()                                     # skips without an MPI launcher
    r = run_job(["-m", "dpcnn.scaling", "--ranks", "1,2", "--steps", "3", "--warmup", "1",
                 "--repeat", "2", "--no-torch", "--json"], timeout=100)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["ranks"] for x in rows] == [1, 2]
    assert all(len(x["images_per_second_runs"]) == 2 and x["images_per_second"] == min(x["images_per_second_runs"])
               for x in rows)                     # the lower middle of two launches
    base = rows[0]["images_per_second"]
    assert rows[1]["efficiency"] == round(rows[1]["images_per_second"] / (2 * base), 3)
    assert rows[0]["imbalance_ms"] == 0                                   # one rank: nothing to wait for
    assert rows[1]["allreduce_bytes"] == 4 * (ModelSpec().num_params + 4)     # float32: gradient and 4 counters


def test_scaling_figures_follow_their_definitions():
    """summarise() on known timings: 2 ranks, 4 steps, (compute, wait, transfer) seconds per step."""
    t = np.zeros((2, 4, 3))
    t[0, :, 0] = [1e-3, 2e-3, 1e-3, 4e-3]          # rank 0 compute
    t[1, :, 0] = [3e-3, 2e-3, 1e-3, 2e-3]          # rank 1 compute
    t[:, :, 1] = 0.5e-3
    t[:, :, 2] = [[0.1e-3] * 4, [0.3e-3] * 4]
    r = summarise(t, wall=0.02, batch=32)
    assert r["images_per_second"] == 2 * 32 * 4 / 0.02 and r["ms_per_step"] == 5.0
    assert r["compute_ms"] == 2.0 and r["allreduce_wait_ms"] == 0.5 and r["allreduce_transfer_ms"] == 0.2
    # per step: slowest minus mean compute = 1, 0, 0, 1 ms -> 0.5 ms on average
    assert r["imbalance_ms"] == 0.5
    assert r["compute_p99_ms"] == pytest.approx(1e3 * np.percentile(t[:, :, 0], 99), abs=1e-3)
    assert efficiency(3000.0, 4, 1000.0) == 0.75 and efficiency(2000.0, 2, 1000.0) == 1.0


@pytest.mark.timeout(120)
def test_scaling_worker_failure_ends_the_launch_promptly():
    code = ("import sys, dpcnn.model as m, dpcnn.scaling as s\n"
            "orig = m.CNN.loss_and_grad\n"
            "def failing(self, *a, **k):\n"
            "    from mpi4py import MPI\n"
            "    if MPI.COMM_WORLD.rank == 1: raise MemoryError('simulated')\n"
            "    return orig(self, *a, **k)\n"
            "m.CNN.loss_and_grad = failing\n"
            "sys.exit(s.main(['--worker', 'dpcnn', '--per-rank-batch', '8', '--steps', '5', '--warmup', '1']))\n")
    t0 = time.time()
    r = run_job(["-c", code], nprocs=2, timeout=60)
    assert r.returncode != 0 and time.time() - t0 < 30, r.stderr
    assert "MemoryError: simulated" in r.stderr
