"""Never lose a run: the run directory's lock, verified checkpoints, pruning that keeps the good
ones, stop signals during start-up, torn metrics lines. (The stall watchdog's jobs: test_mpi_jobs.py.)"""

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import child_env, run_job
from helpers import BASE, records, train, wait_for

from dpcnn import checkpoint as ckpt
from dpcnn import evaluate, plot
from dpcnn.cli import EXIT_STOPPED
from dpcnn.rundir import RunDir


def job(tiny_h5, out, *extra):
    return [sys.executable, "-m", "dpcnn.train", "--data", str(tiny_h5), "--out", str(out), *BASE, *map(str, extra)]


# ----------------------------------------------------------------------------- one training per --out


@pytest.mark.timeout(180)
def test_second_training_on_the_same_out_is_refused_and_a_killed_one_leaves_no_lock(tiny_h5, tmp_path, capsys):
    out = tmp_path / "run"
    first = subprocess.Popen(job(tiny_h5, out, "--epochs", "400", "--eval-every", "4"), stderr=subprocess.PIPE,
                             text=True, env=child_env())
    try:
        wait_for(lambda: records(out), "a first record", proc=first)
        assert train(tiny_h5, out, "--seed", "1", "--max-steps", "3") == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--out {out}: another training is using it" in err
        assert f"pid {first.pid}" in err and "host " in err
        before = (out / "config.json").read_text()
        first.kill()                                      # kill -9: the kernel releases the lock
        first.wait(timeout=30)
    finally:
        first.kill()
    assert (out / "config.json").read_text() == before    # the refused run touched nothing
    assert train(tiny_h5, out, "--epochs", "400", "--max-steps", "40") == 0   # resumes, no stale lock
    assert records(out)[-1]["step"] == 40


def test_a_refused_run_leaves_no_empty_directory(tiny_h5, tmp_path, capsys):
    out = tmp_path / "new"
    assert train(tiny_h5, out, "--resume", tmp_path / "nothing.h5") == 1
    assert "no such checkpoint file" in capsys.readouterr().err
    assert not out.exists()


# ----------------------------------------------------------------------------- verified checkpoints


def _flip_a_bit(path: Path, group="params", name="fc1.w", index=1234, bit=30):
    """Flip one bit of one stored float32, as a disk or a copy might."""
    with h5py.File(path, "r") as f:
        offset = f[group][name].id.get_offset()
        itemsize = f[group][name].dtype.itemsize
    assert offset is not None                              # contiguous storage: patch the file's bytes
    with open(path, "r+b") as fh:
        fh.seek(offset + index * itemsize + bit // 8)
        b = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([b[0] ^ (1 << (bit % 8))]))


def test_a_flipped_bit_or_nan_in_a_checkpoint_is_refused_everywhere(tiny_h5, tmp_path, capsys):
    a = tmp_path / "a"
    assert train(tiny_h5, a, "--max-steps", "3") == 0
    good = RunDir(a).checkpoints()[0]
    state = ckpt.load(good)
    # stored without chunk checksums (contiguous), so only the digest can notice
    plain = tmp_path / "plain.h5"
    ckpt.save(plain, state)
    with h5py.File(plain, "a") as f:
        for g in ("params", "velocity"):
            for k in list(f[g]):
                v = f[g][k][...]
                del f[g][k]
                f[g].create_dataset(k, data=v)
    ckpt.load(plain)
    _flip_a_bit(plain)
    with pytest.raises(ckpt.CheckpointError, match=r"plain\.h5: damaged: .*SHA-256"):
        ckpt.load(plain)
    # a NaN written with a matching digest (a diverged state saved by other means) is refused too
    state.params["conv1.w"][0, 0, 0, 0] = np.nan
    nan = tmp_path / "nan.h5"
    ckpt.save(nan, state)
    with pytest.raises(ckpt.CheckpointError, match=r"nan\.h5: holds non-finite values \(in params/conv1.w\)"):
        ckpt.load(nan)
    assert evaluate.main(["--checkpoint", str(nan), "--data", str(tiny_h5)]) == 1
    assert "non-finite" in capsys.readouterr().err
    # and resume: the damaged newest checkpoint is skipped, the run continues from the one before
    b = tmp_path / "b"
    assert train(tiny_h5, b, "--max-steps", "8", "--checkpoint-every", "4") == 0
    newest = RunDir(b).checkpoints()[0]
    nan.replace(newest)                                    # step 3's NaN state under step 8's name
    capsys.readouterr()
    assert train(tiny_h5, b, "--max-steps", "12", "-v") == 0
    err = capsys.readouterr().err
    assert "skipping checkpoint" in err and "resuming from" in err and "ckpt-step000000004.h5" in err


def test_pruning_keeps_the_newest_valid_checkpoints(tiny_h5, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(tiny_h5, out, "--max-steps", "6", "--checkpoint-every", "2", "--keep", "1") == 0
    assert [p.name for p in RunDir(out).checkpoints()] == ["ckpt-step000000006.h5"]
    (out / "ckpt-step000000027.h5").write_bytes(b"\x89HDF\r\n" + b"\0" * 100)     # truncated, later step
    assert train(tiny_h5, out, "--max-steps", "10", "--checkpoint-every", "2", "--keep", "1") == 0
    assert [p.name for p in RunDir(out).checkpoints()] == ["ckpt-step000000010.h5"]
    assert (out / "ckpt-step000000027.h5.damaged").is_file()              # kept aside, not resumed from
    assert records(out)[-1]["step"] == 10 and ckpt.load(RunDir(out).checkpoints()[0]).step == 10
    # a directory whose checkpoints are all unreadable is not restarted from step 0 silently
    for p in RunDir(out).checkpoints():
        p.write_bytes(b"junk")
    before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert train(tiny_h5, out, "--max-steps", "12") == 1
    err = capsys.readouterr().err
    assert "none of its 1 checkpoint(s) can be read" in err.splitlines()[-1]
    assert (out / "metrics.jsonl").read_text() == before


# ----------------------------------------------------------------------------- signals and stalls


@pytest.mark.timeout(120)
def test_a_stop_during_start_up_exits_75_with_nothing_new(tiny_h5, tmp_path):
    """SIGUSR1 while rank 0 is still preparing (here: in the resume): status 75, nothing written."""
    out = tmp_path / "run"
    assert train(tiny_h5, out, "--max-steps", "4") == 0
    def results():                                 # all but the lock, the log and the status (which record the stop)
        return {p.name: p.read_bytes() for p in out.iterdir() if p.name not in (".lock", "train.log", "exit-status")}
    before = results()
    code = ("import os, signal, sys, dpcnn.train as t\n"
            "orig = t.Trainer._resume\n"
            "def resume(self):\n"
            "    os.kill(os.getpid(), signal.SIGUSR1)\n"
            "    return orig(self)\n"
            "t.Trainer._resume = resume\n"
            f"sys.exit(t.main({[str(a) for a in job(tiny_h5, out, '--max-steps', '20')[3:]]!r}))\n")
    r = run_job(["-c", code], nprocs=2, timeout=90)
    assert r.returncode == EXIT_STOPPED, r.stderr
    assert "during start-up" in r.stderr
    assert results() == before
    assert "during start-up" in (out / "train.log").read_text().splitlines()[-1]
    assert (out / "exit-status").read_text() == f"{EXIT_STOPPED}\n"


# ----------------------------------------------------------------------------- torn metrics


def test_a_torn_last_metrics_line_is_skipped_by_readers_and_healed_by_a_resume(tiny_h5, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(tiny_h5, out, "--max-steps", "8", "--eval-every", "4") == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 0.9, "step": 1')                  # a full disk cut this append short
    assert [r.step for r in plot.read_metrics(out / "metrics.jsonl")] == [4, 8]
    assert "incomplete last line" in capsys.readouterr().err
    assert train(tiny_h5, out, "--max-steps", "12", "--eval-every", "4") == 0
    assert [r["step"] for r in records(out)] == [4, 8, 12]   # rewritten from the checkpoint's records
