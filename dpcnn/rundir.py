"""The run directory: its file names, its lock, config.json, metrics.jsonl and checkpoints.

    runs/latest/
        .lock                   held (flock) by the training that owns the directory
        config.json             the Config and the facts of the run (ranks, nodes, versions)
        metrics.jsonl           one JSON record per evaluation
        train.log               what rank 0's console showed, with times (appended by every attempt)
        tensorboard/            event files for TensorBoard, with --tensorboard
        ckpt-step000001874.h5   the newest --keep step checkpoints
        best.h5                 the checkpoint of the best evaluation so far
        exit-status             the status the last attempt chose (0, 69, 75), for batch scripts

Only rank 0 touches it. One training at a time: ``open`` takes an exclusive lock that the
kernel releases when the process ends in any way, so a second training on the same
directory is refused (naming the holder's host and PID) and a killed one leaves no stale lock.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import socket
from pathlib import Path

from . import checkpoint as ckpt
from .cli import UserError
from .fileio import append_line, write_atomic

log = logging.getLogger(__name__)

STEP_NAME = re.compile(r"^ckpt-step(\d+)\.h5$")
EXIT_STATUS = "exit-status"
OWN_FILES = ("ckpt-step", "best.h5", "metrics.jsonl", "config.json", EXIT_STATUS)   # temporaries: .<name>.<pid>.tmp


class RunDirError(UserError):
    """The run directory cannot be used (one-line message naming it)."""


def step_of(path: Path) -> int:
    """The step in a step checkpoint's name: ckpt-step000000012.h5 -> 12."""
    m = STEP_NAME.match(Path(path).name)
    if m is None:
        raise ValueError(f"{path}: not a step checkpoint name")
    return int(m.group(1))


class RunDir:
    """A training run's directory (rank 0 only)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.config = self.path / "config.json"
        self.metrics = self.path / "metrics.jsonl"
        self.best = self.path / "best.h5"
        self.log = self.path / "train.log"
        self.exit_status = self.path / EXIT_STATUS
        self.tensorboard = self.path / "tensorboard"
        self._lock_fd: int | None = None
        self._created = False

    def step_path(self, step: int) -> Path:
        return self.path / f"ckpt-step{step:09d}.h5"

    # -- owning it -------------------------------------------------------------------

    def open(self) -> None:
        """Create the directory, check that files can be written there, lock it, and remove the
        temporary files of an earlier process that was killed while writing."""
        p = self.path
        if p.exists() and not p.is_dir():
            raise RunDirError(f"--out {p}: exists and is not a directory")
        try:
            self._created = not p.exists()
            p.mkdir(parents=True, exist_ok=True)
            fd = os.open(p / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirError(f"--out {p}: cannot write there ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirError(f"--out {p}: another training is using it ({holder}); wait for it to end, "
                              "stop it, or give another --out") from None
        self._lock_fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
        except OSError as e:
            self.close()
            raise RunDirError(f"--out {p}: cannot write there ({e.strerror or e})") from None
        self.exit_status.unlink(missing_ok=True)               # an earlier attempt's: this one writes its own
        for stale in p.glob(".*.tmp"):
            if stale.name[1:].startswith(OWN_FILES):          # ours, and nobody else holds the lock
                log.debug("removing %s, left by an interrupted write", stale)
                stale.unlink(missing_ok=True)

    def close(self) -> None:
        """Release the lock (the process's end would too). A directory this process created and
        left without results (a run refused before writing anything but its log) is removed."""
        if self._lock_fd is None:
            return
        if self._created and {q.name for q in self.path.iterdir()} <= {".lock", self.log.name}:
            for q in self.path.iterdir():
                q.unlink()
            self.path.rmdir()
        os.close(self._lock_fd)
        self._lock_fd = None

    def __enter__(self) -> RunDir:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- logs, config and metrics -------------------------------------------------------

    def attach_log(self) -> logging.Handler:
        """Copy what the console shows (the root logger: dpcnn's messages) into train.log, with times."""
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
                return p, ckpt.load(p)
            except ckpt.CheckpointError as e:
                log.warning("skipping checkpoint: %s", e)
                damaged.append(str(e))
        if damaged:
            raise RunDirError(f"--out {self.path}: none of its {len(damaged)} checkpoint(s) can be read (newest: "
                              f"{damaged[0]}); move them away to start afresh there, or give another --out")
        return None

    def save_checkpoint(self, state: ckpt.State, best: bool, keep: int) -> Path:
        """Write best.h5 (when best), then ckpt-stepN.h5, then prune to the newest `keep` valid step
        checkpoints. best.h5 first: a process killed between the two resumes from the previous step
        checkpoint, whose best accuracy is lower, so the same evaluation writes best.h5 again; the
        other order could leave a step checkpoint that thinks best.h5 holds what it does not."""
        if best:
            ckpt.save(self.best, state)
        path = ckpt.save(self.step_path(state.step), state)
        self.prune(keep, known_good=path)
        return path

    def prune(self, keep: int, known_good: Path | None = None) -> None:
        """Keep the newest `keep` step checkpoints that load and delete older ones. A damaged one
        newer than those is renamed *.damaged (kept for inspection, out of the way), so it can
        neither displace a good checkpoint nor be resumed from."""
        kept = 0
        for p in self.checkpoints():
            if kept >= keep:
                p.unlink(missing_ok=True)
                continue
            try:
                if p != known_good:
                    ckpt.load(p)
                kept += 1
            except ckpt.CheckpointError as e:
                log.warning("warning: %s; renaming it %s.damaged", e, p.name)
                p.rename(p.with_name(p.name + ".damaged"))

    def check_no_later(self, start_step: int, resumed: Path | None) -> None:
        """Refuse to start at start_step in a directory that holds checkpoints at or past it.

        Pruning keeps the highest steps and a resume takes the newest, so such files would
        outlive and replace the new run's own checkpoints."""
        later = [p for p in self.checkpoints()
                 if step_of(p) >= start_step and (resumed is None or not p.samefile(resumed))]
        if later:
            more = f" and {len(later) - 1} more" if len(later) > 1 else ""
            raise RunDirError(f"--out {self.path} already holds checkpoints at or after step {start_step} "
                              f"({later[-1].name}{more}) that would mix with this run; give another --out, "
                              "delete them, or continue their run with --resume auto")


class Board:
    """TensorBoard event files (written with tensorboardX) beside metrics.jsonl: the same records,
    as curves that `tensorboard --logdir runs` shows while the run goes on."""

    SCALARS = {"train_loss": "loss/train", "val_loss": "loss/val", "test_loss": "loss/test",
               "train_accuracy": "accuracy/train", "val_accuracy": "accuracy/val", "test_accuracy": "accuracy/test",
               "lr": "learning_rate", "images_per_second": "images_per_second"}

    @staticmethod
    def check() -> None:
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            raise RunDirError("--tensorboard needs tensorboardX: pip install 'dpcnn[tensorboard]'") from None

    def __init__(self, directory: Path):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(directory))

    def write(self, record: dict) -> None:
        for key, tag in self.SCALARS.items():
            if record.get(key) is not None:
                self.writer.add_scalar(tag, record[key], record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
