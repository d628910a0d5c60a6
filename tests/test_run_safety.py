"""A run's results are never lost or silently wrong: the directory lock, restarts over results,
checkpoints whose every attribute is checked, the resume rules, runs trained in parts.

Each test here failed on the code before the fix it covers (issue 20: data loss and silent
wrong results)."""

import errno
import fcntl
import os

import h5py
import numpy as np
import pytest
from helpers import assert_same_state, final_state, metrics, records_without_timings, train

from dpcnn import checkpoint as ckpt
from dpcnn.rundir import RunDir, RunDirError

# ----------------------------------------------------------------------------- a directory with results


def test_results_without_a_checkpoint_are_never_restarted_over(tiny_h5, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(tiny_h5, out, "--epochs", "2", "--eval-every", "4") == 0
    for p in RunDir(out).checkpoints():              # the user deleted them (or moved damaged ones away)
        p.unlink()
    kept = {p.name: p.read_bytes() for p in out.iterdir() if p.name in ("best.h5", "metrics.jsonl")}
    capsys.readouterr()
    for extra in ((), ("--resume", "none"), ("--max-steps", "5")):
        assert train(tiny_h5, out, "--epochs", "2", "--eval-every", "4", *extra) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "holds the results of an earlier run (best.h5, metrics.jsonl)" in err, err
        assert f"--resume {out}/best.h5" in err and "give another --out" in err, err
        assert {n: (out / n).read_bytes() for n in kept} == kept
    # only records (best.h5 gone too) are refused as well; the way on that the message names works
    best = out / "best.h5"
    best.rename(tmp_path / "best.h5")
    assert train(tiny_h5, out, "--epochs", "2", "--eval-every", "4") == 1
    assert "(metrics.jsonl)" in capsys.readouterr().err
    (tmp_path / "best.h5").rename(best)
    step = ckpt.load(best).step
    assert train(tiny_h5, out, "--epochs", "2", "--eval-every", "4", "--resume", best) == 0
    assert final_state(out).step == 24 and [m["step"] for m in metrics(out)][0] == 4 and step > 0


def test_a_run_killed_before_its_first_record_starts_again(tiny_h5, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")           # what a run writes before its first record
    (out / "metrics.jsonl").write_text("")
    assert train(tiny_h5, out, "--max-steps", "3") == 0 and final_state(out).step == 3


# ----------------------------------------------------------------------------- the lock


def test_the_lock_survives_its_file_being_removed(tiny_h5, tmp_path):
    out = tmp_path / "run"
    first = RunDir(out)
    first.open()
    try:
        (out / ".lock").unlink()                     # rm RUN/.lock during a run
        with pytest.raises(RunDirError, match="another training is using it"):
            RunDir(out).open()
        assert train(tiny_h5, out, "--max-steps", "2") == 1
    finally:
        first.close()
    assert train(tiny_h5, out, "--max-steps", "2") == 0


def test_a_symlink_at_the_lock_is_never_followed(tiny_h5, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me\n")
    (out / ".lock").symlink_to(precious)
    assert train(tiny_h5, out, "--max-steps", "2") == 0
    assert precious.read_text() == "keep me\n" and not (out / ".lock").is_symlink()


def test_where_a_directory_cannot_be_locked_the_lock_file_is_checked(tmp_path, monkeypatch):
    real = fcntl.flock

    def no_directory_locks(fd, op):                  # as NFS: flock emulated by POSIX locks
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EBADF, "Bad file descriptor")
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", no_directory_locks)
    out = tmp_path / "run"
    first = RunDir(out)
    first.open()
    try:
        with pytest.raises(RunDirError, match="another training is using it"):
            RunDir(out).open()
        (out / ".lock").unlink()
        with pytest.raises(RunDirError, match=r"lock file \.lock was moved, removed or replaced"):
            first.lock.check()
    finally:
        first.close()
    other = tmp_path / "other"
    other.mkdir()
    (other / ".lock").symlink_to(tmp_path / "precious.txt")
    with pytest.raises(RunDirError, match=r"cannot use its lock file \.lock \(a symbolic link\)"):
        RunDir(other).open()
    assert not (tmp_path / "precious.txt").exists()


def test_out_that_cannot_be_a_run_directory(tiny_h5, tmp_path, capsys):
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    assert train(tiny_h5, dangling, "--max-steps", "1") == 1
    err = capsys.readouterr().err
    assert "a symbolic link to" in err and "which does not exist" in err and err.count("\n") == 1, err


# ----------------------------------------------------------------------------- what a checkpoint's digest covers


def _same(a: ckpt.State, b: ckpt.State) -> bool:
    if a.params.keys() != b.params.keys() or any(not np.array_equal(a.params[k], b.params[k]) or
                                                 not np.array_equal(a.velocity[k], b.velocity[k]) for k in a.params):
        return False
    fields = ("epoch", "next_batch", "step", "spec", "config", "data_fingerprint", "metrics", "best_accuracy",
              "elapsed", "version", "world_size", "interval")
    return all(getattr(a, f) == getattr(b, f) for f in fields)


def test_every_attribute_change_is_refused(tiny_h5, tmp_path):
    out = tmp_path / "run"
    assert train(tiny_h5, out, "--max-steps", "6", "--eval-every", "3") == 0
    path = RunDir(out).checkpoints()[0]
    with h5py.File(path, "r") as f:
        names = [n for n in f.attrs if n != "sha256"]
    assert {"step", "epoch", "next_batch", "best_accuracy", "metrics", "interval", "config", "data_fingerprint",
            "world_size", "elapsed", "spec", "sample_order_version"} <= set(names)
    for name in names:
        damaged = tmp_path / f"{name}.h5"
        damaged.write_bytes(path.read_bytes())
        with h5py.File(damaged, "r+") as f:
            v = f.attrs[name]
            f.attrs[name] = (v[:-2] + "0" + v[-1:]) if isinstance(v, str) and v[-2] != "0" else \
                (v[:-2] + "1" + v[-1:]) if isinstance(v, str) else v + 1
        said = r"not a dpcnn checkpoint|checkpoint format" if name.startswith("format") else "SHA-256 mismatch"
        with pytest.raises(ckpt.CheckpointError, match=rf"{name}\.h5: .*({said})"):
            ckpt.load(damaged)


def test_random_bit_flips_outside_the_arrays_never_load_a_changed_state(tiny_h5, tmp_path):
    """Flip single bits in the file's metadata (everything but the arrays' raw bytes, which their
    Fletcher-32 and the digest cover): each load refuses the file or reads exactly what was written."""
    out = tmp_path / "run"
    assert train(tiny_h5, out, "--max-steps", "6", "--eval-every", "3") == 0
    path = RunDir(out).checkpoints()[0]
    good, data = ckpt.load(path), bytearray(path.read_bytes())
    arrays = []
    with h5py.File(path, "r") as f:
        for g in ("params", "velocity"):
            for ds in f[g].values():
                for i in range(ds.id.get_num_chunks()):
                    c = ds.id.get_chunk_info(i)
                    arrays.append((c.byte_offset, c.byte_offset + c.size))
    outside = np.ones(len(data), bool)
    for lo, hi in arrays:
        outside[lo:hi] = False
    where = np.flatnonzero(outside)
    rng = np.random.default_rng(0)
    flipped, refused = tmp_path / "flipped.h5", 0
    for pos, bit in zip(rng.choice(where, 1500), rng.integers(0, 8, 1500)):
        data[pos] ^= 1 << bit
        flipped.write_bytes(data)
        data[pos] ^= 1 << bit
        try:
            s = ckpt.load(flipped)
        except ckpt.CheckpointError:
            refused += 1
            continue
        assert _same(s, good), f"byte {pos} bit {bit}: loaded a changed state"
    assert refused > 100                                    # the flips did reach what is read


# ----------------------------------------------------------------------------- runs in parts


def test_a_run_in_parts_records_what_the_uninterrupted_run_records(tiny_h5, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    args = ("--epochs", "2", "--eval-every", "5")
    assert train(tiny_h5, ref, *args) == 0
    assert train(tiny_h5, run, *args, "--max-steps", "7") == 0      # 7: not an evaluation step
    assert metrics(run)[-1]["step"] == 7 and metrics(run)[-1]["final"]
    assert (run / "best.h5").is_file()
    assert train(tiny_h5, run, *args) == 0
    assert records_without_timings(run) == records_without_timings(ref)
    assert [m["step"] for m in metrics(run)] == [5, 10, 12, 15, 20, 24]
    assert_same_state(final_state(ref), final_state(run))


def test_resuming_at_the_end_from_a_checkpoint_that_was_not_evaluated_records_it(tiny_h5, tmp_path):
    run = tmp_path / "run"
    assert train(tiny_h5, run, "--max-steps", "5", "--checkpoint-every", "4") == 0
    for name in ("best.h5", "metrics.jsonl", "ckpt-step000000005.h5"):
        (run / name).unlink()                         # as if stopped just after the checkpoint at step 4
    (run / "metrics.jsonl").write_text("")
    assert train(tiny_h5, run, "--max-steps", "4") == 0
    assert [(m["step"], m["final"]) for m in metrics(run)] == [(4, True)]
    assert (run / "best.h5").is_file() and ckpt.load(run / "best.h5").step == 4


# ----------------------------------------------------------------------------- what a save costs


def test_a_save_reads_no_kept_checkpoint_back(tiny_h5, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert train(tiny_h5, out, "--max-steps", "6", "--checkpoint-every", "1", "--keep", "6") == 0
    loads = []
    real = ckpt.load
    monkeypatch.setattr(ckpt, "load", lambda p: loads.append(p) or real(p))
    assert train(tiny_h5, out, "--max-steps", "12", "--checkpoint-every", "1", "--keep", "6") == 0
    # the resume reads the newest (6); the first save checks the 4 others it keeps once; later saves read none
    assert len(loads) == 5, loads


# ----------------------------------------------------------------------------- messages that name the cause


def test_messages_name_the_cause(tiny_h5, tmp_path, capsys):
    assert train(tiny_h5, tmp_path / "a", "--batch-size", "5000") == 1          # 384 rows, no validation split
    err = capsys.readouterr().err
    assert "--batch-size 5000: the training split of" in err and "has 384 samples" in err, err
    assert "--val-size" not in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as e:
        train(tiny_h5, "")                                                       # --out '': not the current directory
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --out: expected a path, got an empty string" in err and err.count("\n") == 1, err
    from dpcnn.config import Config, ConfigError
    with pytest.raises(ConfigError, match=r"Config\(data=12\): expected a path"):
        Config(data=12)


def test_no_slowness_warning_from_short_noisy_intervals(tiny_h5, tmp_path, monkeypatch, capsys):
    import time

    from dpcnn.step import TrainStep
    real, calls = TrainStep.compute, {"n": 0}

    def counted(self, *a, **kw):                    # steps 6.. take 20 ms more: over 3x slower, in short intervals
        calls["n"] += 1
        if calls["n"] > 5:
            time.sleep(0.02)
        return real(self, *a, **kw)

    monkeypatch.setattr(TrainStep, "compute", counted)
    assert train(tiny_h5, tmp_path / "run", "--max-steps", "12", "--eval-every", "2", "-v") == 0
    assert "slower than at the start" not in capsys.readouterr().err


def test_ctrl_c_while_a_command_starts_is_one_line(tmp_path):
    """A SIGINT while `python -m dpcnn.<command>` still imports its modules (numpy, h5py): one line,
    the exit status of SIGINT, no traceback."""
    import subprocess
    import sys

    code = ("import sys; sys.argv = ['-m']\nimport dpcnn, os, signal\nos.kill(os.getpid(), signal.SIGINT)\n"
            "import numpy\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode in (130, -2) and r.stderr == "error: interrupted (Ctrl-C) while starting\n", r


# ----------------------------------------------------------------------------- the second adversarial pass


def test_a_run_whose_directory_is_replaced_or_relinked_stops(tiny_h5, tmp_path):
    """The training holds the directory it locked: moved away and replaced (or a link repointed),
    the next write stops the run instead of two trainings writing into one directory."""
    out = tmp_path / "run"
    rd = RunDir(out)
    rd.open()
    try:
        out.rename(tmp_path / "run.old")
        out.mkdir()
        with pytest.raises(RunDirError, match="the directory was moved, removed or replaced"):
            rd.append_metrics({"step": 1})
    finally:
        rd.close()
    link = tmp_path / "latest"
    link.symlink_to(tmp_path / "run.old")
    assert RunDir(link).path == (tmp_path / "run.old").resolve()            # a link is followed once, at the start


def test_resume_from_another_directory_never_lands_on_results(tiny_h5, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert train(tiny_h5, a, "--max-steps", "12") == 0
    assert train(tiny_h5, b, "--max-steps", "12", "--seed", "1") == 0
    for p in RunDir(b).checkpoints():
        p.unlink()
    kept = (b / "metrics.jsonl").read_bytes(), (b / "best.h5").read_bytes()
    capsys.readouterr()
    assert train(tiny_h5, b, "--max-steps", "24", "--resume", RunDir(a).checkpoints()[0]) == 1
    assert "holds the results of an earlier run" in capsys.readouterr().err
    assert ((b / "metrics.jsonl").read_bytes(), (b / "best.h5").read_bytes()) == kept


def test_a_checkpoint_downgraded_to_format_1_is_still_checked(tiny_h5, tmp_path):
    out = tmp_path / "run"
    assert train(tiny_h5, out, "--max-steps", "5") == 0
    path = RunDir(out).checkpoints()[0]
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = 1
        f.attrs["step"] = 3
    with pytest.raises(ckpt.CheckpointError, match="SHA-256 mismatch"):
        ckpt.load(path)
    with h5py.File(path, "r+") as f:                      # the format-2 attributes gone too: no digest at all
        del f.attrs["sha256"], f.attrs["sample_order_version"]
    with pytest.raises(ckpt.CheckpointError, match="without the digest of its arrays"):
        ckpt.load(path)


def test_a_data_file_whose_pixel_statistics_changed_is_another_data_set(tiny_h5, tmp_path, capsys):
    data, out = tmp_path / "d.h5", tmp_path / "run"
    data.write_bytes(tiny_h5.read_bytes())
    assert train(data, out, "--max-steps", "5") == 0
    with h5py.File(data, "r+") as f:
        f.attrs["std"] = float(f.attrs["std"]) * 2
    capsys.readouterr()
    assert train(data, out, "--max-steps", "10") == 1
    assert "saved for another data set" in capsys.readouterr().err


def test_records_of_a_part_ending_at_a_record_point_or_continued_from_best(tiny_h5, tmp_path):
    ref, part, best = tmp_path / "ref", tmp_path / "part", tmp_path / "best"
    args = ("--epochs", "2", "--eval-every", "5")
    assert train(tiny_h5, ref, *args) == 0
    assert train(tiny_h5, part, *args, "--max-steps", "10") == 0           # ends at an --eval-every record
    assert train(tiny_h5, part, *args) == 0
    assert records_without_timings(part) == records_without_timings(ref)    # no stale "final": true
    assert train(tiny_h5, best, *args, "--max-steps", "7") == 0            # a provisional record, best.h5
    for p in RunDir(best).checkpoints():
        p.unlink()
    assert train(tiny_h5, best, *args, "--resume", best / "best.h5") == 0
    assert records_without_timings(best) == records_without_timings(ref)


def test_a_checkpoint_not_holding_the_step_of_its_name_is_skipped(tiny_h5, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(tiny_h5, out, "--max-steps", "8", "--checkpoint-every", "4") == 0
    early = ckpt.load(RunDir(out).step_path(4))
    ckpt.save(RunDir(out).step_path(50), early)                              # step 4 under step 50's name
    capsys.readouterr()
    assert train(tiny_h5, out, "--max-steps", "12", "-v") == 0
    err = capsys.readouterr().err
    assert "holds step 4, not the step of its name" in err and "resuming from" in err and "step000000008" in err
    assert final_state(out).step == 12


def test_a_fifo_at_the_lock_does_not_hang_the_refusal(tmp_path):
    out = tmp_path / "run"
    first = RunDir(out)
    first.open()
    try:
        (out / ".lock").unlink()
        os.mkfifo(out / ".lock")
        with pytest.raises(RunDirError, match="another training is using it"):
            RunDir(out).open()
    finally:
        first.close()


def test_a_data_set_name_is_never_a_path(tmp_path):
    from dpcnn.rundir import default_run_dir
    path, created = default_run_dir("../../escaped/a", lambda d: False, runs=tmp_path / "runs")
    assert created and path.parent == tmp_path / "runs" and path.name == "_.._escaped_a-001"


def test_prepare_never_replaces_a_hand_written_file_named_like_a_data_set(tmp_path, capsys):
    """A file written by hand (or by write_h5) under the name 'mnist', without made_from and without
    MNIST's pinned IDX checksums, is not prepare's to replace."""
    from conftest import blob_arrays

    from dpcnn.datasets import DatasetInfo
    from dpcnn.h5format import write_h5
    from dpcnn.prepare import main as prepare_main
    mine = tmp_path / "mine.h5"
    write_h5(mine, DatasetInfo(name="mnist", class_names=tuple("0123456789")), blob_arrays(), {"mine": "0" * 64})
    with h5py.File(mine, "r+") as f:
        f.attrs.pop("made_from", None)
    before = mine.read_bytes()
    assert prepare_main(["prepare", "--source", str(tmp_path / "nowhere"), "--out", str(mine)]) == 1
    err = capsys.readouterr().err
    assert "that prepare did not make from its IDX files; not replaced" in err and err.count("\n") == 1, err
    assert mine.read_bytes() == before
