"""Commands without --out: each trains in a new runs/<dataset>-NNN, except that the same command
after a stop continues the stopped run; runs/latest points at the newest (issue 21 item 1)."""

import json
import os
import signal

from helpers import BASE, assert_same_state, final_state, metrics

from dpcnn.cli import EXIT_STOPPED
from dpcnn.train import main


def run(data, *extra) -> int:
    return main(["--data", str(data), "--comm", "serial", *BASE, *map(str, extra)])


def test_commands_in_order_each_train_in_their_own_directory(tiny_h5, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run(tiny_h5, "--epochs", "1") == 0                   # the quick start
    assert run(tiny_h5, "--epochs", "1") == 0                   # the same again: a finished run, so a new one
    assert run(tiny_h5, "--epochs", "1", "--shift", "1") == 0   # another example
    runs = tmp_path / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["latest", "tiny-blobs-001", "tiny-blobs-002", "tiny-blobs-003"]
    assert os.readlink(runs / "latest") == "tiny-blobs-003"
    for n in ("001", "002", "003"):
        assert metrics(runs / f"tiny-blobs-{n}")[-1]["final"]
    assert json.loads((runs / "latest" / "config.json").read_text())["shift"] == 1
    assert json.loads((runs / "tiny-blobs-003" / "config.json").read_text())["out"] == "runs/tiny-blobs-003"


def test_the_same_command_after_a_stop_continues_the_stopped_run(tiny_h5, tmp_path, monkeypatch):
    from dpcnn import train as T
    monkeypatch.chdir(tmp_path)
    ref = tmp_path / "ref"
    assert main(["--data", str(tiny_h5), "--comm", "serial", *BASE, "--epochs", "2", "--out", str(ref)]) == 0
    orig = T.Trainer.train_step

    def step(self, *a):
        if self.step == 7:                              # SIGTERM arrives during step 8
            self.stop.signum = signal.SIGTERM
        return orig(self, *a)

    monkeypatch.setattr(T.Trainer, "train_step", step)
    assert run(tiny_h5, "--epochs", "2") == EXIT_STOPPED
    monkeypatch.setattr(T.Trainer, "train_step", orig)
    stopped = tmp_path / "runs" / "tiny-blobs-001"
    assert final_state(stopped).step == 8
    assert run(tiny_h5, "--epochs", "2", "--lr", "0.1") == 0     # other settings: a new run, the stopped one kept
    assert final_state(stopped).step == 8 and (tmp_path / "runs" / "tiny-blobs-002").is_dir()
    # runs/latest now points at the finished run 002: the stopped 001 is continued by naming it
    assert run(tiny_h5, "--epochs", "2", "--out", "runs/tiny-blobs-001") == 0
    assert_same_state(final_state(ref), final_state(stopped))


def test_a_stopped_newest_run_is_continued_by_the_same_command(tiny_h5, tmp_path, monkeypatch):
    from dpcnn import train as T
    monkeypatch.chdir(tmp_path)
    orig = T.Trainer.train_step

    def step(self, *a):
        if self.step == 4:
            self.stop.signum = signal.SIGTERM
        return orig(self, *a)

    monkeypatch.setattr(T.Trainer, "train_step", step)
    assert run(tiny_h5, "--epochs", "1") == EXIT_STOPPED
    monkeypatch.setattr(T.Trainer, "train_step", orig)
    assert run(tiny_h5, "--epochs", "1") == 0                   # the same command: continues tiny-blobs-001
    runs = tmp_path / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["latest", "tiny-blobs-001"]
    assert final_state(runs / "tiny-blobs-001").step == 12
    assert "resumed_from" in json.loads((runs / "latest" / "config.json").read_text())


def test_latest_follows_out_runs_in_runs_and_a_small_set_names_its_batch(tiny_h5, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run(tiny_h5, "--epochs", "1") == 0
    assert run(tiny_h5, "--epochs", "1", "--out", "runs/photos") == 0
    assert os.readlink(tmp_path / "runs" / "latest") == "photos"
    assert run(tiny_h5, "--epochs", "1", "--out", str(tmp_path / "elsewhere")) == 0
    assert os.readlink(tmp_path / "runs" / "latest") == "photos"           # outside runs/: not followed
    capsys.readouterr()
    assert main(["--data", str(tiny_h5), "--comm", "serial", "-q", "--batch-size", "360"]) == 1   # 384 rows
    err = capsys.readouterr().err
    assert "--batch-size 360: the training split of" in err and "(346 once 38 are held out for validation)" in err
