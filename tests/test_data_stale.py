"""Temporaries left by killed writers (`.NAME.<pid>[@<host>].tmp|.part`) are removed by the next prepare."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _idx import make_source

from dpcnn import fileio
from dpcnn.fileio import remove_stale_temporaries, temp_name
from dpcnn.idx import prepare_dataset

TESTS = Path(__file__).parent


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(p.stdout)


def zombie():
    """A child that has exited but is not reaped yet: /proc says state Z, os.kill(pid, 0) still works."""
    p = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        state = Path(f"/proc/{p.pid}/stat").read_text().rpartition(")")[2].split()[0]
        if state == "Z":
            return p
        time.sleep(0.01)
    pytest.fail("the child never became a zombie")


def test_temp_name_carries_pid_and_host(tmp_path):
    name = temp_name(tmp_path / "mnist.h5", ".part").name
    assert name == f".mnist.h5.{os.getpid()}@{fileio._host()}.part"


def test_prepare_removes_temporaries_of_dead_writers_only(tmp_path):
    info, _ = make_source(tmp_path / "src")
    out = tmp_path / "tiny.h5"
    dead, host = dead_pid(), fileio._host()
    z = zombie()
    try:
        stale = [f".tiny.h5.{dead}.tmp", f".tiny.h5.{dead}@{host}.tmp", f".tiny.h5.{z.pid}@{host}.tmp"]
        kept = [f".tiny.h5.{os.getppid()}@{host}.tmp",         # a live writer (here: our parent)
                f".tiny.h5.{dead}@elsewhere.example.tmp",        # another host's: cannot tell, keep
                f".other.h5.{dead}.tmp", f".tiny.h5.bak.{dead}.tmp", "tiny.h5.123.tmp"]
        for name in stale + kept:
            (tmp_path / name).write_bytes(b"x" * 1000)
        old = tmp_path / f".tiny.h5.{dead + 1}@elsewhere.example.part"   # untouched for two days
        old.write_bytes(b"x")
        os.utime(old, (time.time() - 2 * 86400,) * 2)
        prepare_dataset(source=tmp_path / "src", out=out, info=info)
        assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == sorted(kept + ["tiny.h5"])
    finally:
        z.wait()


def test_fetch_removes_stale_partial_downloads(tmp_path):
    cache = tmp_path / "downloads" / "tiny"
    cache.mkdir(parents=True)
    part = cache / f".train-images-idx3-ubyte.gz.{dead_pid()}.part"
    part.write_bytes(b"half")
    assert remove_stale_temporaries(cache / "train-images-idx3-ubyte.gz") == [part]
    assert not part.exists()


KILLED = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from _idx import make_source
from dpcnn.idx import prepare_dataset
d = Path(sys.argv[1])
info, _ = make_source(d / "src", n_train=2000)
os.replace = lambda *a: time.sleep(60)          # hang with the temporary written, before its rename
prepare_dataset(source=d / "src", out=d / "tiny.h5", info=info)
"""


def test_prepare_after_kill_9_removes_the_killed_writers_temporary(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", KILLED, str(tmp_path), str(TESTS)],
                         env={**os.environ, "PYTHONPATH": str(TESTS.parent)})
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:                 # until the temporary is written whole
            left = list(tmp_path.glob(".tiny.h5.*.tmp"))
            if left and left[0].stat().st_size > 1_000_000:
                break
            assert p.poll() is None, "the writer ended before writing"
            time.sleep(0.05)
        assert len(left) == 1 and left[0].stat().st_size > 1_000_000
    finally:
        p.kill()
        p.wait()
    info, _ = make_source(tmp_path / "src", n_train=2000)
    prepare_dataset(source=tmp_path / "src", out=tmp_path / "tiny.h5", info=info)
    assert not left[0].exists() and (tmp_path / "tiny.h5").exists()
