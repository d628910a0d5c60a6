"""The benchmark commands run and report what the README says they report (no timing asserted)."""

import json
import time

import numpy as np
import pytest
from conftest import mpiexec, run_job

from dpcnn import bench
from dpcnn.comm import SerialComm
from dpcnn.model import ModelSpec
from dpcnn.scaling import efficiency, summarise
from dpcnn.step import TrainStep


def fake_clock(monkeypatch, float_times, exact_times, grid_times=None):
    """bench.time_steps replaced: runs each stepper once and returns the next of the given times
    for the step it drives (float, exact, or exact with grid sums only: by its TrainStep's exact
    and gather flags); returns the list of steppers timed."""
    times = {(False, False): iter(float_times), (True, True): iter(exact_times),
             (True, False): iter(grid_times or exact_times)}
    seen = []

    def time_steps(stepper, n, clock=None):
        seen.append(stepper)
        stepper()
        return next(times[stepper.step.exact, stepper.step.gather])

    monkeypatch.setattr(bench, "time_steps", time_steps)
    return seen


def test_bench_reports_the_float_and_exact_steps_from_their_own_timings(monkeypatch):
    """Known timings in: images/s from the float step's median, exact_cost the median of the
    per-round exact / float - 1 (here 1.1, 1.05, 1.2), rounds alternating float and exact."""
    seen = fake_clock(monkeypatch, [2e-3, 4e-3, 3e-3], [2.2e-3, 4.2e-3, 3.6e-3], [3e-3, 5e-3, 3e-3])
    r = bench.run(batch_size=32, steps=1, rounds=3, use_torch=False, micro_batch=8)
    assert [(s.step.exact, s.step.gather) for s in seen] == [(False, False), (True, True), (True, False)] * 3
    assert r["grid_exact_cost"] == 0.25 and r["exact_gathers"]      # 1.5, 1.25, 1.0
    assert r["images_per_second"] == round(32 / 3e-3, 1) and r["ms_per_step"] == 3.0
    assert r["exact_ms_per_step"] == 3.6 and r["exact_images_per_second"] == round(32 / 3.6e-3, 1)
    assert r["exact_cost"] == 0.1 and r["exact_cost_range"] == [0.05, 0.2]
    assert r["num_params"] == ModelSpec().num_params == 103018 and "torch_images_per_second" not in r


def test_bench_steps_are_the_trainers_float_and_exact_steps():
    """What the bench times: TrainStep on the bench's batch, the float path (float32 buffer, one
    pass) and the exact path (float64 buffer of exact sums, the given micro-batch); each call
    is one training step that moves the parameters, the same as TrainStep called directly."""
    spec = ModelSpec()
    for exact in (False, True):
        stepper = bench.Stepper(spec, 20, micro_batch=8, exact=exact)
        assert stepper.step.exact is exact and stepper.step.micro_batch == 8 and len(stepper.y) == 20
        assert stepper.step.buf.array.dtype == (np.float64 if exact else np.float32)
        ref = TrainStep(spec, SerialComm(), micro_batch=8, seed=0, momentum=0.9, nesterov=True, weight_decay=5e-4,
                        exact=exact)
        before = stepper.step.model.params.copy()
        for _ in range(2):
            r = stepper()
            ref(stepper.x, stepper.y, 20, 0.01)
        assert r.samples == 20 and not np.array_equal(stepper.step.model.params, before)
        assert np.array_equal(stepper.step.model.params, ref.model.params)


def test_bench_command_line_reaches_the_run(monkeypatch, capsys):
    seen = fake_clock(monkeypatch, [1e-3] * 2, [1.5e-3] * 2)
    assert bench.main(["--batch-size", "8", "--micro-batch", "4", "--rounds", "2", "--steps", "1", "--no-torch",
                       "--clock", "cpu", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["batch_size"], r["micro_batch"], r["threads"], r["rounds"], r["clock"]) == (8, 4, 1, 2, "cpu")
    assert r["exact_cost"] == 0.5 and {s.step.micro_batch for s in seen if s.step.exact} == {4}
    fake_clock(monkeypatch, [1e-3] * 2, [1.5e-3] * 2)
    assert bench.main(["--batch-size", "8", "--rounds", "2", "--steps", "1", "--no-torch"]) == 0
    assert "exact against float: +50.0%" in capsys.readouterr().out


@pytest.mark.parametrize("exact", [False, True])
def test_bench_profile_accounts_for_the_step(exact):
    rows = dict(bench.profile(batch_size=8, threads=1, steps=3, exact=exact, micro_batch=4))
    assert {"im2col", "conv_backward", "maxpool_forward", "softmax_cross_entropy", "SGD update"} <= set(rows)
    assert ("exact.add_rows (round and add)" in rows) is exact
    # own times exclude nested calls (im2col inside conv_forward...): counted twice, the layer
    # functions would add up to more than the step, leaving "everything else" negative
    rest = rows.pop("everything else (model and step glue)")
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
