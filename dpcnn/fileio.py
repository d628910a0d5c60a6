"""Writing files so that a crash, a kill or a full disk never leaves a half-written one.

Every output of dpcnn (prepared data, checkpoints, config.json, metrics.jsonl) goes
through here. Whole files are written to a hidden temporary name beside the target,
fsynced and renamed (``os.replace`` is atomic on POSIX), so a reader sees the old
file or the new one. Appends (metrics.jsonl) cannot be atomic: ``append_line`` writes
each line with one ``write`` call, and readers skip a torn last line.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import h5py

from .cli import UserError

# Hidden temporary names: .<target name>.<pid><suffix>. A killed writer leaves one behind;
# `stale_temporaries` finds those whose process is gone.
TMP_SUFFIXES = (".tmp", ".part")


class WriteError(UserError):
    """An output file could not be written (full disk, read-only, not a directory, ...)."""


def temp_name(path: Path, suffix: str = ".tmp") -> Path:
    """A hidden temporary name beside `path`, unique to this process."""
    return path.with_name(f".{path.name}.{os.getpid()}{suffix}")


def stale_temporaries(directory: Path) -> list[Path]:
    """Temporary files in `directory` left by writers that are no longer running (this host)."""
    out = []
    for p in Path(directory).glob(".*"):
        stem, _, suffix = p.name.rpartition(".")
        pid = stem.rpartition(".")[2]
        if f".{suffix}" in TMP_SUFFIXES and pid.isdigit() and not _alive(int(pid)):
            out.append(p)
    return out


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # someone else's process
        return True
    try:                             # a zombie (exited, not yet reaped) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return True


def fsync_dir(d: Path) -> None:
    """Make a rename in directory d durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | str | memoryview) -> Path:
    """Replace `path` with `data`: temporary file, one write, fsync, rename. WriteError naming
    the file on failure, with nothing left behind."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WriteError(f"{path}: could not write it ({e.strerror or e}); nothing was written") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def append_line(path: Path, line: str) -> None:
    """Append one line (newline added) with a single write; WriteError naming the file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line.rstrip("\n") + "\n").encode())
        finally:
            os.close(fd)
    except OSError as e:
        raise WriteError(f"{path}: could not write it ({e.strerror or e})") from None


def write_h5_atomic(path: Path, fill: Callable[[h5py.File], None]) -> Path:
    """Create the HDF5 file `path` with fill(f): all of it or nothing, even on a full disk.

    The file is built in memory, then written with `write_atomic`. A failing write (full
    disk, quota) is then one clean WriteError; failing writes inside the HDF5 library itself
    can crash the process. Meant for files that fit in memory (checkpoints, MNIST-sized data).
    """
    mem = io.BytesIO()
    with h5py.File(mem, "w") as f:
        fill(f)
    return write_atomic(Path(path), mem.getbuffer())
