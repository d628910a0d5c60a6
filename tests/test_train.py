"""The trainer end to end: outputs, exact resume, checkpoints, rank-count equivalence, failures.

Multi-rank jobs are launched with mpiexec as subprocesses, each under a timeout, so a
hang fails the test instead of the CI run.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from conftest import child_env, mpiexec, run_job, write_tiny
from helpers import (
    BASE,
    assert_same_state,
    final_state,
    job_args,
    metrics,
    rank_pids,
    records_without_timings,
    train,
)

from dpcnn import checkpoint as ckpt
from dpcnn.cli import EXIT_STOPPED
from dpcnn.rundir import RunDir, step_of
from dpcnn.train import main


def test_serial_run_outputs(tiny_h5, tmp_path):
    out = tmp_path / "run"
    assert train(tiny_h5, out, "--epochs", "3", "--eval-every", "6") == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["world_size"] == 1 and cfg["batch_size"] == 32 and cfg["num_params"] == 103018
    assert cfg["model"]["channels"] == [8, 16] and "numpy" in cfg["versions"]
    rows = metrics(out)
    need = {"epoch", "step", "train_loss", "test_loss", "test_accuracy", "images_per_second", "elapsed_seconds",
            "world_size", "global_batch_size", "lr", "time_compute_s", "time_data_s", "time_allreduce_s"}
    assert all(need <= set(r) for r in rows)
    assert [r["step"] for r in rows] == [6, 12, 18, 24, 30, 36]     # one record per step, also at epoch ends
    assert rows[-1]["final"] and rows[-1]["epoch"] == 3.0
    assert rows[-1]["test_accuracy"] > 0.9 and rows[-1]["test_loss"] < rows[0]["test_loss"]
    assert sum(1 for _ in out.glob("ckpt-step*.h5")) == 3 and (out / "best.h5").is_file()


def test_resume_is_bit_identical(tiny_h5, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert train(tiny_h5, a, "--max-steps", "17") == 0
    assert train(tiny_h5, b, "--max-steps", "7") == 0             # stops mid-epoch, checkpoint at 7
    assert train(tiny_h5, b, "--max-steps", "17") == 0            # --resume auto is the default
    assert_same_state(final_state(a), final_state(b))
    assert metrics(a)[-1]["test_loss"] == metrics(b)[-1]["test_loss"]
    assert json.loads((b / "config.json").read_text())["resumed_from"].endswith("ckpt-step000000007.h5")
    before, config = metrics(b), (b / "config.json").read_text()
    assert train(tiny_h5, b, "--max-steps", "17", "--threads", "2") == 0   # a finished run: nothing to do
    assert metrics(b) == before and final_state(b).step == 17
    assert (b / "config.json").read_text() == config              # still describes the run that trained


@pytest.mark.parametrize("stop_at", [12, 8, 5], ids=["epoch-end", "eval-step", "plain-step"])
def test_stop_and_resume_records_like_an_uninterrupted_run(tiny_h5, tmp_path, monkeypatch, stop_at):
    """A stop signal on an epoch's last step or an --eval-every step loses no record."""
    from dpcnn import train as T
    ref, run = tmp_path / "ref", tmp_path / "run"
    args = ("--epochs", "2", "--eval-every", "4")
    assert train(tiny_h5, ref, *args) == 0
    orig = T.Trainer.train_step

    def step(self, *a):
        if self.step == stop_at - 1:                # the signal arrives during this step
            self.stop.signum = signal.SIGTERM
        return orig(self, *a)

    monkeypatch.setattr(T.Trainer, "train_step", step)
    assert train(tiny_h5, run, *args) == EXIT_STOPPED
    assert final_state(run).step == stop_at
    monkeypatch.setattr(T.Trainer, "train_step", orig)
    assert train(tiny_h5, run, *args) == 0
    assert [m["step"] for m in metrics(run)] == [m["step"] for m in metrics(ref)] == [4, 8, 12, 16, 20, 24]
    for key in ("test_loss", "train_loss", "train_accuracy"):      # the training totals survive the stop
        assert [m[key] for m in metrics(run)] == [m[key] for m in metrics(ref)], key
    assert_same_state(final_state(ref), final_state(run))


def test_checkpoint_every_also_on_evaluation_steps(tiny_h5, tmp_path):
    out = tmp_path / "run"
    assert train(tiny_h5, out, "--epochs", "2", "--eval-every", "5", "--checkpoint-every", "10", "--keep", "10") == 0
    records = metrics(out)
    assert [m["step"] for m in records] == [5, 10, 12, 15, 20, 24]
    # epoch ends (12, 24), every 10 steps, and the records within an epoch that were the best so far (best.h5)
    best, improved = -1.0, set()
    for m in records:
        if m["test_accuracy"] > best:
            best, improved = m["test_accuracy"], improved | {m["step"]}
    assert 5 in improved
    assert [step_of(p) for p in RunDir(out).checkpoints()] == sorted({24, 20, 12, 10} | (improved & {5, 15}),
                                                                     reverse=True)


def test_evaluate_reproduces_the_records_bit_for_bit(tiny_h5, tmp_path, capsys):
    """evaluate on the last checkpoint gives the last record's validation and test loss and
    accuracy exactly (one BLAS thread, as training; the loss is an order-free fixed-point sum)."""
    from threadpoolctl import threadpool_limits

    from dpcnn import evaluate
    out = tmp_path / "run"
    assert train(tiny_h5, out, "--max-steps", "7", "--val-size", "64") == 0
    last = metrics(out)[-1]
    for split in ("val", "test"):
        with threadpool_limits(2):                  # evaluate sets its own --threads (default 1)
            assert evaluate.main(["--checkpoint", str(RunDir(out).checkpoints()[0]), "--split", split, "--json"]) == 0
        r = json.loads(capsys.readouterr().out)
        assert (r["loss"], r["accuracy"]) == (last[f"{split}_loss"], last[f"{split}_accuracy"]), split


def test_a_loss_far_above_guessing_warns_about_the_learning_rate(tiny_h5, tmp_path, capsys):
    assert train(tiny_h5, tmp_path / "ok", "--epochs", "1") == 0
    assert "warning" not in capsys.readouterr().err
    assert train(tiny_h5, tmp_path / "hot", "--epochs", "1", "--lr", "2", "--schedule", "constant") == 0
    err = capsys.readouterr().err
    assert err.count("warning: training loss") == 1 and "(ln 10 = 2.30)" in err and "--lr (now 2)" in err, err


def test_resume_past_max_steps_changes_nothing(tiny_h5, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(tiny_h5, out, "--max-steps", "7") == 0
    def results():                                # everything but the log, which says what happened
        return {p.name: p.read_bytes() for p in out.iterdir() if p.name != "train.log"}
    files = results()
    capsys.readouterr()
    assert train(tiny_h5, out, "--max-steps", "3", "-v") == 0
    assert "at step 7 of 3: nothing to train" in capsys.readouterr().err
    assert results() == files
    assert "nothing to train" in (out / "train.log").read_text().splitlines()[-1]


def test_resume_refuses_another_schedule_and_mixing_runs(tiny_h5, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(tiny_h5, out, "--epochs", "4", "--max-steps", "6") == 0
    capsys.readouterr()
    for extra, said in ((["--lr", "0.5"], "1 setting: --lr 0.5 (saved: --lr 0.05);"),
                        (["--epochs", "8"], "(saved: --epochs 4)"),
                        (["--schedule", "step"], "(saved: --schedule cosine)"),
                        (["--momentum", "0.5"], "(saved: --momentum 0.9)"), (["--no-nesterov"], "--no-nesterov (saved"),
                        (["--keep-last"], "--keep-last (saved: no --keep-last)"),
                        (["--exact"], "--exact (saved: --no-exact)"),
                        (["--lr", "0.5", "--seed", "3", "--exact"],
                         "3 settings: --seed 3 (saved: --seed 0), --lr 0.5 (saved: --lr 0.05), "
                         "--exact (saved: --no-exact)")):
        assert train(tiny_h5, out, "--epochs", "4", "--max-steps", "12", *extra) == 1
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1, err
    # a new run in a directory that holds another run's checkpoints would be pruned in their favour
    assert train(tiny_h5, out, "--epochs", "4", "--resume", "none") == 1
    err = capsys.readouterr().err
    assert "already holds checkpoints" in err and "ckpt-step000000006.h5" in err, err
    # without --exact, the micro-batch and the threads change no bits: not compared
    assert train(tiny_h5, out, "--epochs", "4", "--max-steps", "9", "--micro-batch", "8", "--threads", "2") == 0
    assert train(tiny_h5, out, "--epochs", "4", "--max-steps", "12") == 0     # same settings: continues
    assert final_state(out).step == 12


def test_an_exact_run_resumes_only_as_exact_with_its_micro_batch_and_threads(tiny_h5, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(tiny_h5, out, "--max-steps", "4", "--exact") == 0
    capsys.readouterr()
    for extra, said in ((["--no-exact"], "1 setting: --no-exact (saved: --exact)"),
                        (["--exact", "--micro-batch", "8", "--threads", "2"],
                         "2 settings: --micro-batch 8 (saved: --micro-batch 16), --threads 2 (saved: --threads 1)")):
        assert train(tiny_h5, out, "--max-steps", "8", *extra) == 1
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1, err
    assert json.loads((out / "config.json").read_text())["exact"] is True      # still describes the run
    assert train(tiny_h5, out, "--max-steps", "8", "--exact") == 0 and final_state(out).step == 8


def test_corrupt_newest_checkpoint_is_skipped(tiny_h5, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert train(tiny_h5, a, "--max-steps", "10") == 0
    assert train(tiny_h5, b, "--max-steps", "8", "--checkpoint-every", "4") == 0
    newest = RunDir(b).checkpoints()[0]
    assert newest.name == "ckpt-step000000008.h5"
    newest.write_bytes(newest.read_bytes()[:1000])                # a torn file
    capsys.readouterr()
    assert train(tiny_h5, b, "--max-steps", "10", "-v") == 0
    err = capsys.readouterr().err
    assert "skipping checkpoint" in err and "step000000008.h5: unreadable" in err
    assert_same_state(final_state(a), final_state(b))


def test_checkpoint_damaged_inside_is_skipped(tiny_h5, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert train(tiny_h5, a, "--max-steps", "10") == 0
    assert train(tiny_h5, b, "--max-steps", "8", "--checkpoint-every", "4") == 0
    with h5py.File(RunDir(b).checkpoints()[0], "a") as f:            # step 8: one parameter missing
        del f["params/conv1.b"]
    with pytest.raises(ckpt.CheckpointError, match=r"step000000008\.h5: damaged: .*SHA-256 mismatch"):
        ckpt.load(RunDir(b).checkpoints()[0])
    capsys.readouterr()
    assert train(tiny_h5, b, "--max-steps", "10", "-v") == 0
    assert "skipping checkpoint" in capsys.readouterr().err
    assert_same_state(final_state(a), final_state(b))


def test_mismatched_checkpoint_is_refused(tiny_h5, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(tiny_h5, out, "--max-steps", "3") == 0
    capsys.readouterr()
    assert train(tiny_h5, out, "--max-steps", "6", "--channels", "4,8") == 1
    err = capsys.readouterr().err
    assert "saved for model" in err and "ckpt-step000000003.h5" in err and err.count("\n") == 1
    other = write_tiny(tmp_path / "other.h5", seed=1)
    with h5py.File(other, "a") as f:
        f.attrs["source_sha256"] = json.dumps({"tiny": "1" * 64})
    assert main(["--data", str(other), "--out", str(out), "--comm", "serial", *BASE]) == 1
    assert "another data set" in capsys.readouterr().err
    assert train(tiny_h5, out, "--max-steps", "6", "--seed", "5") == 1
    assert "--seed" in capsys.readouterr().err


def test_missing_data_and_bad_flags(tmp_path, capsys):
    rc = main(["--data", str(tmp_path / "none.h5"), "--data-source", str(tmp_path / "nowhere"),
               "--out", str(tmp_path / "r"), "--comm", "serial", "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and f"--data-source {tmp_path / 'nowhere'}: not a directory" in err
    assert not (tmp_path / "none.h5").exists()
    # a --data file that does not exist is an error, not a place to prepare MNIST (without --data-source)
    rc = main(["--data", str(tmp_path / "photos.h5"), "--out", str(tmp_path / "r"), "--comm", "serial", "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and f"--data {tmp_path / 'photos.h5'}: no such file" in err, err
    assert not (tmp_path / "photos.h5").exists() and not (tmp_path / "r").exists()
    with pytest.raises(SystemExit) as e:
        main(["--batch-size", "0"])
    assert e.value.code == 2 and "--batch-size" in capsys.readouterr().err


def test_checkpoint_write_killed_leaves_previous_loadable(tiny_h5, tmp_path):
    out = tmp_path / "run"
    assert train(tiny_h5, out, "--max-steps", "2") == 0
    good = RunDir(out).checkpoints()[0]
    # a child writes a large checkpoint at a later step and is SIGKILLed during the write
    code = f"""
import numpy as np, dpcnn.checkpoint as c, dpcnn.rundir as r
s = c.load({str(good)!r}); s.step = 99
s.params = {{f"p{{i}}": np.ones(2**22, np.float32) for i in range(64)}}
c.save(r.RunDir({str(out)!r}).step_path(99), s)
"""
    p = subprocess.Popen([sys.executable, "-c", code], env=child_env())
    deadline = time.time() + 60
    while not list(out.glob(".ckpt-step000000099.h5.*.tmp")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.01)
    assert list(out.glob(".ckpt-step000000099.h5.*.tmp")), "the write never started"
    time.sleep(0.2)
    p.kill()
    assert p.wait(timeout=30) == -signal.SIGKILL, "the write finished before the kill"
    assert not (out / "ckpt-step000000099.h5").exists()
    path, state = RunDir(out).newest_valid()
    assert path == good and state.step == 2


# ------------------------------------------------------------------------- multi-rank jobs


@pytest.mark.timeout(240)
def test_same_bits_on_1_2_3_ranks(tiny_h5, tmp_path):
    """Same seed, global batch and micro-batch: bit-identical parameters, momentum and records.

    Batch 28 with --keep-last and micro-batches of 4: 14 steps an epoch, the last of 20
    samples; on 3 ranks 7 micro-batches go 3/2/2 (5 go 2/2/1 in the last batch). 30 steps:
    more than two epochs."""
    runs = {}
    for p in (1, 2, 3):
        out = tmp_path / f"p{p}"
        r = run_job(job_args(tiny_h5, out, "--max-steps", "30", "--batch-size", "28", "--micro-batch", "4",
                             "--keep-last", "--eval-every", "8", "--exact"), nprocs=p)
        assert r.returncode == 0, r.stderr
        runs[p] = out
        assert [m["step"] for m in metrics(out)] == [8, 14, 16, 24, 28, 30]
        assert all(m["world_size"] == p for m in metrics(out))
    for p in (2, 3):
        assert records_without_timings(runs[p]) == records_without_timings(runs[1]), p
        assert_same_state(final_state(runs[p]), final_state(runs[1]))
        assert_same_state(ckpt.load(runs[p] / "best.h5"), ckpt.load(runs[1] / "best.h5"))
    assert metrics(runs[1])[-1]["test_loss"] < 0.5 * metrics(runs[1])[0]["test_loss"]      # and it did learn


@pytest.mark.timeout(300)
def test_same_bits_on_1_2_3_ranks_on_real_mnist(mnist_h5, tmp_path):
    """The default model and batch on MNIST, 200 steps: P = 1, 2, 3 end with the same bits
    (64 = 4 micro-batches of 16: 2/1/1 on 3 ranks)."""
    states, records = {}, {}
    for p in (1, 2, 3):
        out = tmp_path / f"p{p}"
        r = run_job(["-m", "dpcnn.train", "--data", mnist_h5, "--out", out, "--max-steps", "200", "--eval-every",
                     "100", "--threads", "1", "--no-progress", "-q", "--exact"], nprocs=p, timeout=240)
        assert r.returncode == 0, r.stderr
        states[p], records[p] = final_state(out), records_without_timings(out)
    for p in (2, 3):
        assert_same_state(states[p], states[1])
        assert records[p] == records[1]
    assert records[1][-1]["test_accuracy"] > 0.9


@pytest.mark.timeout(120)
def test_the_default_float_path_trains_the_same_to_rounding_on_1_and_2_ranks(tiny_h5, tmp_path):
    """Without --exact (float32 sums, one pass per rank): rank counts agree to float32 rounding."""
    loss = {}
    for p in (1, 2):
        out = tmp_path / f"p{p}"
        r = run_job(job_args(tiny_h5, out, "--max-steps", "8", "--eval-every", "8", "--lr", "0.005"), nprocs=p)
        assert r.returncode == 0, r.stderr
        loss[p] = metrics(out)[-1]["test_loss"]
    assert abs(loss[2] - loss[1]) / loss[1] < 1e-5


def test_threads_reach_blas_inside_the_run_and_are_recorded(tiny_h5, tmp_path, monkeypatch):
    """--threads N is what BLAS runs with during the steps (the bits depend on it, so the exact
    guarantee names it), config.json records it, and the process's own limit is back afterwards."""
    from threadpoolctl import threadpool_info

    from dpcnn.step import TrainStep
    seen, orig = [], TrainStep.compute

    def compute(self, *a, **kw):
        seen.append({p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"})
        return orig(self, *a, **kw)

    monkeypatch.setattr(TrainStep, "compute", compute)
    before = {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"}
    for t in (1, 2):
        seen.clear()
        assert train(tiny_h5, tmp_path / f"t{t}", "--max-steps", "3", "--threads", t) == 0
        assert seen and all(s == {t} for s in seen), seen
        assert json.loads((tmp_path / f"t{t}" / "config.json").read_text())["threads_per_rank"] == t
    assert {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"} == before


@pytest.mark.timeout(120)
def test_job_with_missing_data_exits_promptly(tmp_path):
    t0 = time.time()
    r = run_job(["-m", "dpcnn.train", "--data", tmp_path / "none.h5", "--data-source", tmp_path / "nowhere",
                 "--out", tmp_path / "r"], nprocs=2, timeout=60)
    assert r.returncode != 0 and time.time() - t0 < 30
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "none.h5" in errors[0], r.stderr


@pytest.mark.timeout(120)
def test_one_rank_raising_ends_every_rank(tiny_h5, tmp_path):
    code = ("import sys, dpcnn.train as t\n"
            "orig = t.Trainer.train_step\n"
            "def step(self, *a):\n"
            "    if self.comm.rank == 1 and self.step == 3: raise MemoryError('simulated failure')\n"
            "    return orig(self, *a)\n"
            "t.Trainer.train_step = step\n"
            f"sys.exit(t.main({[str(a) for a in job_args(tiny_h5, tmp_path / 'r', '--epochs', '50')[2:]]!r}))\n")
    t0 = time.time()
    r = run_job(["-c", code], nprocs=2, timeout=60)
    assert r.returncode != 0 and time.time() - t0 < 30
    assert "error: rank 1: MemoryError: simulated failure" in r.stderr


@pytest.mark.timeout(120)
def test_ranks_started_with_different_settings_are_refused(tiny_h5, tmp_path):
    args = [sys.executable, *map(str, job_args(tiny_h5, tmp_path / "r", "--max-steps", "2"))]
    for other, differing in ((["--seed", "3"], "seed"), (["--channels", "4,8"], "channels, model, num_params")):
        r = subprocess.run([mpiexec(), "-n", "1", *args, ":", "-n", "1", *args, *other], capture_output=True,
                           text=True, timeout=60, env=child_env())
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert r.returncode == 1 and len(errors) == 1, r.stderr
        assert f"rank(s) [1] were started with other settings than rank 0 (differing: {differing})" in errors[0]





@pytest.mark.timeout(300)
def test_sigterm_on_one_rank_checkpoints_and_resumes_exactly(tiny_h5, tmp_path):
    run = tmp_path / "run"
    cmd = [mpiexec(), "-n", "2", sys.executable, *map(str, job_args(tiny_h5, run, "--epochs", "400",
                                                                    "--eval-every", "4", "--exact"))]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        deadline = time.time() + 90
        while not ((run / "metrics.jsonl").is_file() and metrics(run)):
            assert p.poll() is None, p.communicate()
            assert time.time() < deadline, "no evaluation recorded within 90 s"
            time.sleep(0.1)
        pids = rank_pids(p.pid)
        assert len(pids) == 2
        t0 = time.time()
        os.kill(pids[-1], signal.SIGTERM)              # one rank only: the others learn at the next step
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == EXIT_STOPPED, err
    assert time.time() - t0 < 20
    stopped = final_state(run)
    assert 0 < stopped.step < 400 * 12 and "stop requested by signal" in err
    # resume on 2 ranks: bit-identical to an uninterrupted 2-rank run to the same step
    target = stopped.step + 5
    ref = tmp_path / "ref"
    for out in (run, ref):
        r = run_job(job_args(tiny_h5, out, "--epochs", "400", "--max-steps", target, "--exact"), nprocs=2)
        assert r.returncode == 0, r.stderr
    assert_same_state(final_state(run), final_state(ref))
    # resume the stopped checkpoint on 3 ranks, and run it uninterrupted on 1: the same bits
    other, single = tmp_path / "other", tmp_path / "single"
    r = run_job(job_args(tiny_h5, other, "--epochs", "400", "--max-steps", target, "--exact",
                         "--resume", RunDir(run).step_path(stopped.step)), nprocs=3)
    assert r.returncode == 0, r.stderr
    r = run_job(job_args(tiny_h5, single, "--epochs", "400", "--max-steps", target, "--exact"))
    assert r.returncode == 0, r.stderr
    assert_same_state(final_state(other), final_state(ref))
    assert_same_state(final_state(single), final_state(ref))
    assert records_without_timings(single) == records_without_timings(ref)


@pytest.mark.parametrize("first", ["SIGUSR1", "SIGINT"])
def test_first_signal_sets_the_flag_second_exits_at_once(first):
    """A second signal ends the process at once, unless it comes within SAME_SIGNAL_S of the first:
    then it is the same request delivered twice (Slurm's SIGTERM and mpiexec forwarding it)."""
    code = ("import os, signal, time\n"
            "from dpcnn.watchdog import SAME_SIGNAL_S, StopRequest\n"
            "s = StopRequest().install()\n"
            f"os.kill(os.getpid(), signal.{first})\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"               # at once: the same request
            "time.sleep(0.1)\n"
            f"assert s.signum == signal.{first}, s.signum\n"
            "print('flag set', flush=True)\n"
            "time.sleep(SAME_SIGNAL_S)\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "time.sleep(5)\n"
            "print('still running')\n")
    r = run_job(["-c", code], timeout=30)
    assert r.stdout.strip() == "flag set" and r.returncode == 128 + signal.SIGTERM
    assert "second signal" in r.stderr


def test_schedule_flags_become_steps():
    """--milestones below 1 are fractions of the run, others epochs; warm-up is in epochs."""
    from dpcnn.config import parse_args
    from dpcnn.train import make_schedule
    cfg, _ = parse_args(["--schedule", "step", "--epochs", "10", "--milestones", "0.5,8",
                         "--gamma", "0.1", "--lr", "1", "--warmup-epochs", "0.25"])
    s = make_schedule(cfg, steps_per_epoch=12, total_steps=120)
    assert s.milestones == (60, 96) and s.warmup_steps == 3
    assert [s(k) for k in (0, 1, 2)] == pytest.approx([1 / 3, 2 / 3, 1])
    assert (s(59), s(60), s(95), s(96)) == pytest.approx((1, 0.1, 0.1, 0.01))
    cos = make_schedule(parse_args(["--lr", "1"])[0], steps_per_epoch=12, total_steps=96)
    assert cos(0) == 1 and cos(48) == pytest.approx(0.5) and cos(95) < 0.001


def test_divergence_stops_before_saving_nonfinite_weights(tiny_h5, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(tiny_h5, out, "--lr", "1e10", "--max-steps", "5", "--checkpoint-every", "1") == 1
    err = capsys.readouterr().err
    m = re.match(r"error: training diverged in step (\d+): .* lower --lr than 1e\+10", err)
    assert m and err.count("\n") == 1, err
    saved = RunDir(out).checkpoints()
    assert saved and RunDir(out).step_path(int(m.group(1))) not in saved    # the steps before it, not it
    for path in saved:                                   # and what was saved is finite
        assert all(np.isfinite(v).all() for v in ckpt.load(path).params.values()), path
    for flag, value in (("--momentum", "1"), ("--seed", "-1"), ("--milestones", "nan"), ("--lr", "inf")):
        with pytest.raises(SystemExit) as e:
            main([flag, value])
        assert e.value.code == 2 and flag in capsys.readouterr().err


def test_unusable_run_directory_is_named(tiny_h5, tmp_path, capsys):
    afile = tmp_path / "file"
    afile.write_text("x")
    for out in (afile, afile / "sub"):
        assert train(tiny_h5, out, "--max-steps", "1") == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out {out}") and err.count("\n") == 1, err
    run = tmp_path / "run"                          # temporary files of a killed writer are cleared
    run.mkdir()
    (run / ".ckpt-step000000004.h5.999.tmp").write_bytes(b"partial")
    assert train(tiny_h5, run, "--max-steps", "1") == 0
    assert not list(run.glob(".*tmp*"))


def test_run_directory_keeps_the_console_log_and_tensorboard_events(tiny_h5, tmp_path):
    pytest.importorskip("tensorboardX")
    import struct

    from tensorboardX.proto.event_pb2 import Event
    out = tmp_path / "run"
    assert main(["--data", str(tiny_h5), "--out", str(out), "--comm", "serial", "--batch-size", "32", "--val-size", "0",
                 "--no-progress", "--threads", "1", "--max-steps", "24", "--eval-every", "6", "--tensorboard"]) == 0
    text = (out / "train.log").read_text()
    assert "dpcnn 0." in text and "step 24" in text and "done: 24 steps" in text
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", text)                 # with times
    tags = {}
    for events in (out / "tensorboard").glob("events.out.tfevents.*"):    # TFRecord: length, crc, data, crc
        raw = events.read_bytes()
        i = 0
        while i < len(raw):
            (n,) = struct.unpack("<Q", raw[i:i + 8])
            e = Event.FromString(raw[i + 12:i + 12 + n])
            i += 16 + n
            for v in e.summary.value:
                tags.setdefault(v.tag, []).append((e.step, v.simple_value))
    assert [s for s, _ in tags["accuracy/test"]] == [6, 12, 18, 24]
    # the training curves also between records, at the progress interval (every step here: 12 an epoch)
    for tag in ("loss/train", "accuracy/train", "learning_rate", "images_per_second"):
        assert [s for s, _ in tags[tag]] == list(range(1, 25)), tag
    assert tags["loss/train"][5][1] == pytest.approx(metrics(out)[0]["train_loss"], rel=1e-6)   # step 6
    assert tags["loss/test"][-1][1] == pytest.approx(metrics(out)[-1]["test_loss"], rel=1e-6)
    # a run refused at start leaves no directory behind, log included
    assert main(["--data", str(tiny_h5), "--out", str(tmp_path / "new"), "--comm", "serial", "-q",
                 "--resume", str(tmp_path / "missing.h5")]) == 1
    assert not (tmp_path / "new").exists()


def test_a_run_far_slower_than_its_start_says_why(tiny_h5, tmp_path, capsys, monkeypatch):
    """Another program taking the cores mid-run: the rate drops; one warning says what to try."""
    from dpcnn.step import TrainStep
    orig, done = TrainStep.compute, {"n": 0}

    def compute(self, *a, **kw):                 # 0.1 s a step, then from step 6 on something else holds
        done["n"] += 1                           # the core: 0.4 s (the intervals: over MIN_RATE_S of steps)
        time.sleep(0.1 if done["n"] <= 6 else 0.4)
        return orig(self, *a, **kw)

    monkeypatch.setattr(TrainStep, "compute", compute)
    loud = [a for a in BASE if a != "-q"]
    assert main(["--data", str(tiny_h5), "--out", str(tmp_path / "run"), "--comm", "serial", *loud,
                 "--max-steps", "18", "--eval-every", "6"]) == 0
    err = capsys.readouterr().err
    assert err.count("slower than at the start of this run") == 1 and "use fewer ranks than free cores" in err
