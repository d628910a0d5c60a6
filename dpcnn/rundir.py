"""The run directory: its file names, its lock, config.json, metrics.jsonl and checkpoints.

    runs/latest/
        .lock                   host and pid of the training that holds the directory's lock (DirLock)
        config.json             the Config and the facts of the run (ranks, nodes, versions)
        metrics.jsonl           one JSON record per evaluation
        train.log               what rank 0's console showed, with times (appended by every attempt)
        tensorboard/            event files for TensorBoard, with --tensorboard (dpcnn.records.Board)
        ckpt-step000001874.h5   the newest --keep step checkpoints
        best.h5                 the checkpoint of the best evaluation so far
        exit-status             the status the last attempt chose (0, 69, 75), for batch scripts

Rank 0 writes it; the one exception is exit-status, which the rank whose watchdog ends the
job writes. One training at a time: ``open`` takes an exclusive lock on the directory that the
kernel releases when the process ends in any way, so a second training on the same directory
is refused (naming the holder's host and PID) and a killed one leaves no stale lock.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from . import checkpoint as ckpt
from .cli import UserError
from .fileio import append_line, write_atomic

log = logging.getLogger(__name__)

STEP_NAME = re.compile(r"^ckpt-step(\d+)\.h5$")
EXIT_STATUS = "exit-status"
LOCK_INFO = ".lock"                         # host and pid of the training holding the lock
# the files whose temporaries (.<name>.<pid>@<host>.tmp) an interrupted write leaves here
OWN_FILES = (LOCK_INFO, "ckpt-step", "best.h5", "metrics.jsonl", "config.json", EXIT_STATUS)


class RunDirError(UserError):
    """The run directory cannot be used (one-line message naming it)."""


def step_of(path: Path) -> int:
    """The step in a step checkpoint's name: ckpt-step000000012.h5 -> 12."""
    m = STEP_NAME.match(Path(path).name)
    if m is None:
        raise ValueError(f"{path}: not a step checkpoint name")
    return int(m.group(1))


def _check_named(p: Path, s: ckpt.State) -> None:
    """CheckpointError unless the step in a step checkpoint's name is the step it holds."""
    if step_of(p) != s.step:
        raise ckpt.CheckpointError(f"{p}: holds step {s.step}, not the step of its name")


def _signature(p: Path) -> tuple | None:
    """(inode, size, mtime) of a file: whether it changed since it was last read."""
    try:
        st = p.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class DirLock:
    """The exclusive lock of a run directory, which one training holds while it uses it.

    The lock is on the directory itself (flock on an O_DIRECTORY descriptor): nothing inside it
    can be deleted or replaced to make a second training miss it, and the kernel releases it
    when the process ends in any way. Where the file system cannot lock a directory (NFS
    emulates flock with POSIX locks, which need a file open for writing), the lock is the file
    .lock, opened without following a symbolic link and checked (``check``), after locking and
    before every checkpoint, to still be the file at that name. .lock holds the holder's host
    and pid, for the refusal of a second training."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None
        self.ino: int | None = None        # the lock file's inode, where the directory cannot be locked

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self) -> None:
        """Take the exclusive lock of the directory, or RunDirError naming its holder."""
        p = self.path
        fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            self._refuse_held()
        except OSError as e:                                    # no flock on directories here
            os.close(fd)
            log.debug("--out %s: cannot lock the directory (%s): locking its %s file instead", p, e, LOCK_INFO)
            self._acquire_file()
            return
        self.fd = fd

    def _acquire_file(self) -> None:
        lock = self.path / LOCK_INFO
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            what = "a symbolic link" if lock.is_symlink() else e.strerror or str(e)
            raise RunDirError(f"--out {self.path}: cannot use its lock file {LOCK_INFO} ({what}); "
                              "remove it if no training runs there") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            self._refuse_held()
        self.fd, self.ino = fd, os.fstat(fd).st_ino
        self.check()

    def check(self) -> None:
        """RunDirError when what this process locked is no longer what the path names: the directory
        moved or replaced (a link repointed), or the lock file removed or replaced; another training
        may be writing there."""
        if self.fd is None:
            return
        try:
            if self.ino is None:
                a, b = os.stat(self.path), os.fstat(self.fd)
                same = (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
            else:
                same = os.lstat(self.path / LOCK_INFO).st_ino == self.ino
        except OSError:
            same = False
        if not same:
            what = "the directory" if self.ino is None else f"its lock file {LOCK_INFO}"
            raise RunDirError(f"--out {self.path}: {what} was moved, removed or replaced while this training held "
                              "it; another training may be writing there: stopping")

    def _refuse_held(self) -> NoReturn:
        try:
            fd = os.open(self.path / LOCK_INFO, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            try:
                holder = os.read(fd, 200).decode(errors="replace").strip() if stat.S_ISREG(os.fstat(fd).st_mode) \
                    else ""
            finally:
                os.close(fd)
        except OSError:
            holder = ""
        raise RunDirError(f"--out {self.path}: another training is using it ({holder or 'unknown'}); wait for it "
                          "to end, stop it, or give another --out") from None

    def write_holder(self) -> None:
        holder = f"host {socket.gethostname()} pid {os.getpid()}\n"
        if self.ino is None:                                   # replaced, never written through a link
            write_atomic(self.path / LOCK_INFO, holder)
        else:                                                  # the locked file itself
            assert self.fd is not None
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, holder.encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
        self.fd = self.ino = None


class RunDir:
    """A training run's directory (rank 0 only)."""

    def __init__(self, path: Path, created: bool = False):
        path = Path(path)
        # a link (runs/latest) is followed once: the run writes to the directory it named at the start
        self.path = path.resolve() if path.is_symlink() and path.is_dir() else path
        self.fresh = created                     # made for this run just now (default_run_dir)
        self.config = self.path / "config.json"
        self.metrics = self.path / "metrics.jsonl"
        self.best = self.path / "best.h5"
        self.log = self.path / "train.log"
        self.exit_status = self.path / EXIT_STATUS
        self.tensorboard = self.path / "tensorboard"
        self.lock = DirLock(self.path)
        self._created = False
        self._verified: dict[str, tuple | None] = {}   # checkpoint name -> (inode, size, mtime) when it last loaded

    def step_path(self, step: int) -> Path:
        return self.path / f"ckpt-step{step:09d}.h5"

    # -- owning it -------------------------------------------------------------------

    def open(self) -> None:
        """Create the directory, check that files can be written there, lock it, and remove the
        temporary files of an earlier process that was killed while writing."""
        p = self.path
        if p.is_symlink() and not p.exists():
            raise RunDirError(f"--out {p}: a symbolic link to {os.readlink(p)}, which does not exist; "
                              "create its target or give another --out")
        if p.exists() and not p.is_dir():
            raise RunDirError(f"--out {p}: exists and is not a directory")
        try:
            self._created = self.fresh or not p.exists()
            p.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunDirError(f"--out {p}: cannot create it ({e.strerror or e})") from None
        self.lock.acquire()
        try:
            self.lock.write_holder()
        except (UserError, OSError) as e:
            self.close()
            raise RunDirError(f"--out {p}: cannot write there ({getattr(e, 'strerror', None) or e})") from None
        self.exit_status.unlink(missing_ok=True)               # an earlier attempt's: this one writes its own
        for stale in p.glob(".*.tmp"):
            if stale.name[1:].startswith(OWN_FILES):          # ours, and nobody else holds the lock
                log.debug("removing %s, left by an interrupted write", stale)
                stale.unlink(missing_ok=True)

    def close(self) -> None:
        """Release the lock (the process's end would too). A directory this process created and
        left without results (a run refused before writing anything but its log) is removed."""
        if not self.lock.held:
            return
        if self._created and {q.name for q in self.path.iterdir()} <= {LOCK_INFO, self.log.name}:
            for q in self.path.iterdir():
                q.unlink()
            self.path.rmdir()
        self.lock.release()

    def __enter__(self) -> RunDir:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- logs, config and metrics -------------------------------------------------------

    def attach_log(self) -> logging.Handler:
        """Copy dpcnn's messages (the root logger's: INFO and up, DEBUG with -v) into train.log, with times,
        however quiet the console is (-q sets the console handler's level, not the root's: cli.setup_logging)."""
        h = logging.FileHandler(self.log, encoding="utf-8")
        h.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logging.getLogger().addHandler(h)
        return h

    def write_config(self, config: dict) -> None:
        write_atomic(self.config, json.dumps(config, indent=2) + "\n")

    def write_metrics(self, records: list[dict]) -> None:
        """Replace metrics.jsonl with these records (a resumed run keeps what its checkpoint knew)."""
        write_atomic(self.metrics, "".join(json.dumps(r) + "\n" for r in records))

    def append_metrics(self, record: dict) -> None:
        self.lock.check()
        append_line(self.metrics, json.dumps(record))

    # -- checkpoints -----------------------------------------------------------------

    def checkpoints(self) -> list[Path]:
        """The step checkpoints, newest (highest step) first."""
        found = [p for p in self.path.glob("ckpt-step*.h5") if STEP_NAME.match(p.name)]
        return sorted(found, key=step_of, reverse=True)

    def newest_valid(self) -> tuple[Path, ckpt.State] | None:
        """The newest checkpoint that loads (damaged ones are reported and skipped); None when there
        are none. RunDirError when there are some but none loads: starting afresh would silently
        overwrite that run's records."""
        damaged = []
        for p in self.checkpoints():
            try:
                state = ckpt.load(p)
                _check_named(p, state)
            except ckpt.CheckpointError as e:
                log.warning("skipping checkpoint: %s", e)
                damaged.append(str(e))
                continue
            self._mark_verified(p)
            return p, state
        if damaged:
            raise RunDirError(f"--out {self.path}: none of its {len(damaged)} checkpoint(s) can be read (newest: "
                              f"{damaged[0]}); move them away to start afresh there, or give another --out")
        return None

    def save_checkpoint(self, state: ckpt.State, keep: int, best: ckpt.State | None = None) -> Path:
        """Write best.h5 (the state `best`, when given), then ckpt-stepN.h5, then prune to the newest
        `keep` valid step checkpoints. best.h5 first: a process killed between the two resumes from the previous step
        checkpoint, whose best accuracy is lower, so the same evaluation writes best.h5 again; the
        other order could leave a step checkpoint that thinks best.h5 holds what it does not."""
        self.lock.check()
        if best is not None:
            ckpt.save(self.best, best)
        path = ckpt.save(self.step_path(state.step), state)
        self._mark_verified(path)                       # written from memory, fsynced: known good
        self.prune(keep)
        return path

    def _mark_verified(self, p: Path) -> None:
        self._verified[p.name] = _signature(p)

    def prune(self, keep: int) -> None:
        """Keep the newest `keep` step checkpoints that load and delete older ones. A damaged one
        newer than those is renamed *.damaged (kept for inspection, out of the way), so it can
        neither displace a good checkpoint nor be resumed from.

        A checkpoint is read to check it only once while this process holds the directory (this
        process wrote it, or loaded it, and it has not changed since), so a save costs the same
        whatever --keep is."""
        kept = 0
        for p in self.checkpoints():
            if kept >= keep:
                p.unlink(missing_ok=True)
                self._verified.pop(p.name, None)
                continue
            sig = _signature(p)
            if sig is not None and self._verified.get(p.name) == sig:
                kept += 1
                continue
            try:
                _check_named(p, ckpt.load(p))
                self._verified[p.name] = sig
                kept += 1
            except ckpt.CheckpointError as e:
                log.warning("warning: %s; renaming it %s.damaged", e, p.name)
                p.rename(p.with_name(p.name + ".damaged"))

    def results(self) -> list[str]:
        """The names of an earlier run's results here: best.h5, records in metrics.jsonl, checkpoints
        set aside as damaged. A directory holding any is never silently restarted."""
        found = [self.best.name] if self.best.exists() else []
        try:
            if self.metrics.read_text(errors="replace").strip():
                found.append(self.metrics.name)
        except OSError:
            pass
        return found + sorted(p.name for p in self.path.glob("ckpt-step*.h5.damaged"))

    def find_resume(self, choice: str, check: Callable[[ckpt.State, Path], None]) -> tuple[Path, ckpt.State] | None:
        """The checkpoint a run with --resume `choice` continues from ('auto': the newest valid one
        here, if any; 'none'; or a path), after check(state, path) accepted it; None for a new run.
        RunDirError when starting there would lose or mix in what the directory holds (check_start)."""
        path: Path | None = None
        state: ckpt.State | None = None
        if choice == "auto":
            path, state = self.newest_valid() or (None, None)
        elif choice != "none":
            path = Path(choice)
            state = ckpt.load(path)
        if state is not None and path is not None:
            check(state, path)
        if choice != "auto" or state is None:
            self.check_start(state.step if state else 0, path)
        return (path, state) if state is not None and path is not None else None

    def check_start(self, start_step: int, resumed: Path | None) -> None:
        """Refuse to start at start_step (0: a new run) unless nothing here can be lost or mixed in.

        Checkpoints at or past start_step: pruning keeps the highest steps and a resume takes the
        newest, so they would outlive and replace the new run's own. A new run in a directory
        holding results (best.h5, records) and no checkpoint to continue from would overwrite them."""
        later = [p for p in self.checkpoints()
                 if step_of(p) >= start_step and (resumed is None or not p.samefile(resumed))]
        if later:
            more = f" and {len(later) - 1} more" if len(later) > 1 else ""
            raise RunDirError(f"--out {self.path} already holds checkpoints at or after step {start_step} "
                              f"({later[-1].name}{more}) that would mix with this run; give another --out, "
                              "delete them, or continue their run with --resume auto")
        inside = resumed is not None and resumed.absolute().parent == self.path.absolute()
        results = [] if inside else self.results()
        if results:
            cont = (f"continue from its best.h5 with --resume {self.best}, or " if self.best.name in results
                    else "")
            raise RunDirError(f"--out {self.path} holds the results of an earlier run ({', '.join(results)}) but no "
                              f"step checkpoint to continue it from; {cont}give another --out (or move those "
                              "files away) to start afresh")


class Checkpointer:
    """When and how rank 0 writes a run's step checkpoints: when asked (record points, a stop), every
    --checkpoint-every steps and --checkpoint-minutes; once per step; never non-finite weights."""

    def __init__(self, run_dir: RunDir, keep: int, every: int, minutes: float):
        self.run_dir, self.keep, self.every, self.minutes = run_dir, keep, every, minutes
        self.saved_step: int | None = None       # step of the last checkpoint this process wrote
        self.last = time.monotonic()

    def due(self, step: int) -> bool:
        if self.every and step % self.every == 0:
            return True
        return bool(self.minutes) and time.monotonic() - self.last >= 60 * self.minutes

    def save(self, step: int, state: Callable[[], ckpt.State], finite: bool, best: bool = False,
             best_state: ckpt.State | None = None) -> None:
        """ckpt-stepN.h5 of state() (and best.h5 when best: of best_state, else the same state)."""
        if self.saved_step == step:
            return
        if not finite:                          # diverging: the next loss check stops every rank
            log.warning("warning: not saving a checkpoint at step %d: the weights are not finite", step)
            return
        t0 = time.perf_counter()
        s = state()
        path = self.run_dir.save_checkpoint(s, self.keep, best=(best_state or s) if best else None)
        self.saved_step, self.last = step, time.monotonic()
        log.debug("checkpoint %s written in %.3f s", path, time.perf_counter() - t0)


# ----------------------------------------------------------------------- the run directory of a command without --out

RUNS = Path("runs")
LATEST = "latest"


def default_run_dir(dataset: str, same_run: Callable[[Path], bool], runs: Path = RUNS) -> tuple[Path, bool]:
    """The run directory of a training started without --out, and whether it was made just now.

    The newest run (runs/latest) is continued when it stopped before its end (no final record),
    no training holds it, and it was started with this command's settings (same_run): so the
    same command after a stop (Ctrl-C, SIGTERM, a requeue, a crash) resumes. Otherwise a new
    directory runs/<dataset>-NNN (the next number) is made, so that commands with other settings,
    or the same command after a finished run, train anew instead of refusing or finding nothing to
    do. runs/latest then points at the run (a symbolic link; a runs/latest directory of an older
    dpcnn is left as it is, and is continued the same way)."""
    latest = runs / LATEST
    stopped = latest.is_dir() and _unfinished(latest) and not _locked(latest)
    if stopped and same_run(latest):
        path = latest.resolve() if latest.is_symlink() else latest
        log.info("continuing the stopped run in %s (%s), started with these settings; --out DIR starts another",
                 path, latest)
        return path, False
    runs.mkdir(parents=True, exist_ok=True)
    dataset = re.sub(r"[^A-Za-z0-9._-]", "_", dataset).lstrip(".") or "run"     # a name, never a path
    pattern = re.compile(rf"^{re.escape(dataset)}-(\d+)$")
    n = max((int(m.group(1)) for p in runs.iterdir() if (m := pattern.match(p.name))), default=0)
    while True:
        n += 1
        path = runs / f"{dataset}-{n:03d}"
        try:
            path.mkdir()                               # atomic: two trainings started at once get two
            break
        except FileExistsError:
            continue
    if stopped:
        log.info("the newest run, %s, stopped before its end with other settings: a new run in %s (continue that "
                 "one with --out %s)", latest.resolve(), path, latest.resolve())
    return path, True


def point_latest(path: Path, runs: Path = RUNS) -> None:
    """Make runs/latest a symbolic link to the run directory `path` when that is in runs/ (a
    runs/latest directory of an older dpcnn is left as it is)."""
    latest = runs / LATEST
    if Path(path).absolute().parent != runs.absolute() or path.name == LATEST or \
            (latest.exists() and not latest.is_symlink()):
        return
    tmp = runs / f".{LATEST}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(path.name)
    os.replace(tmp, latest)


def _unfinished(d: Path) -> bool:
    """A run started there (config.json) and did not reach its end (no final record)."""
    if not (d / "config.json").is_file():
        return False
    try:
        lines = (d / "metrics.jsonl").read_text(errors="replace").splitlines()
    except OSError:
        return True
    return not any('"final": true' in line for line in lines[-1:])


def _locked(d: Path) -> bool:
    lock = DirLock(d.resolve())
    try:
        lock.acquire()
    except RunDirError:
        return True
    lock.release()
    return False
