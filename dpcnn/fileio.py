"""Writing files so that a crash, a kill or a full disk never leaves a half-written one.

Every output of dpcnn (prepared data, checkpoints, config.json, metrics.jsonl) goes
through here. Whole files are written to a hidden temporary name beside the target,
fsynced and renamed (``os.replace`` is atomic on POSIX), so a reader sees the old
file or the new one. Appends (metrics.jsonl) cannot be atomic: ``append_line`` writes
each line with one ``write`` call, and readers skip a torn last line.
"""

from __future__ import annotations

import glob
import io
import os
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

import h5py

from .cli import UserError

# Hidden temporary names: .<target name>.<pid>@<host><suffix>. A writer killed before its rename
# leaves one behind; `remove_stale_temporaries` removes those whose writer is gone.
TMP_SUFFIXES = (".tmp", ".part")
STALE_AFTER_S = 24 * 3600  # a temporary untouched this long is stale whoever wrote it


class WriteError(UserError):
    """An output file could not be written (full disk, read-only, not a directory, ...)."""


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"


def temp_name(path: Path, suffix: str = ".tmp") -> Path:
    """A hidden temporary name beside `path`, unique to this process on this host."""
    return path.with_name(f".{path.name}.{os.getpid()}@{_host()}{suffix}")


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporaries of `path` (``.NAME.<pid>[@<host>].tmp|.part``) whose writer is gone.

    A writer is gone when its host is this one (or unnamed) and its pid is not running (or is a
    zombie), or when the file has not been modified for STALE_AFTER_S. A live writer on another
    host sharing the file system is left alone. Returns the paths removed.
    """
    path = Path(path)
    prefix, here, now, removed = f".{path.name}.", _host(), time.time(), []
    for p in path.parent.glob(f".{glob.escape(path.name)}.*"):
        tag, dot, suffix = p.name[len(prefix):].rpartition(".")
        pid, _, host = tag.partition("@")
        if not (dot and f".{suffix}" in TMP_SUFFIXES and pid.isascii() and pid.isdigit()):
            continue
        try:
            old = now - p.lstat().st_mtime > STALE_AFTER_S
        except OSError:
            continue
        if old or (host in ("", here) and not _alive(int(pid))):
            try:
                p.unlink()
            except OSError:          # gone already, or not ours to remove: leave it
                continue
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    """Whether process `pid` is running on this host; a zombie (exited, not yet reaped) is not."""
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # someone else's process
        return True
    except OverflowError:            # not a pid at all
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
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
