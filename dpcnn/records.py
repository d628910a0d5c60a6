"""What a run records and shows: one ``Record`` per evaluation, and where it goes.

A ``Record`` is one line of metrics.jsonl (``asdict``), one point of each TensorBoard curve
(``Board``) and one console line (``Monitor``); ``plot`` and ``evaluate`` read them back by
attribute (``read_records``). Between two records, the training totals of the global batches
and where this process's time went add up in an ``Interval``; ``Progress`` shows them on
rank 0 as the steps go by.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .cli import console_shows

log = logging.getLogger("dpcnn")

SLOW = 3.0            # this many times slower than the start of the run: say why
COLLAPSED = 0.02      # a training loss within this fraction of ln(classes) at two records in a row after the
                      # warm-up: a collapsed run
MIN_RATE_S = 0.5      # ... comparing only intervals with this many seconds of steps (shorter ones are noise)


@dataclass
class Record:
    """The run at one evaluation: training totals since the previous record, validation and test
    results, and where the time went. None where there is nothing to report (no validation split,
    no training step since the last record, a record of an older dpcnn without the field)."""

    epoch: float                                 # step / steps_per_epoch, rounded to 4 places
    step: int
    train_loss: float | None = None              # mean over the samples trained since the last record
    train_accuracy: float | None = None
    val_loss: float | None = None
    val_accuracy: float | None = None
    test_loss: float | None = None
    test_accuracy: float | None = None
    test_per_class_accuracy: list | None = None  # (K,) None for a class without test samples
    images_per_second: float | None = None       # of this process's training since the last record
    elapsed_seconds: float | None = None         # training wall time so far, over all attempts
    world_size: int | None = None
    global_batch_size: int | None = None
    lr: float | None = None                      # the learning rate of the last step
    time_data_s: float | None = None             # seconds since the last record: reading batches,
    time_compute_s: float | None = None          # forward and backward, allreduce, update,
    time_allreduce_s: float | None = None        # and this evaluation
    time_update_s: float | None = None
    time_eval_s: float | None = None
    final: bool = False                          # the run's last record

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Record:
        """A record read back (metrics.jsonl, a checkpoint): unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def selection_accuracy(self) -> float:
        """What chooses best.h5: the validation accuracy, or the test accuracy without a validation split."""
        acc = self.test_accuracy if self.val_accuracy is None else self.val_accuracy
        return -1.0 if acc is None else acc


class RecordsError(ValueError):
    """metrics.jsonl cannot be read as records (message: file, line, what)."""


def read_records(path: Path) -> list[Record]:
    """The records of a metrics.jsonl; a torn last line (a writer cut off) is skipped with a
    warning; RecordsError (naming the file and line) for anything else that is not a record."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:     # binary junk: "not a JSON line"
        lines = f.readlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines) and not line.endswith("\n"):
                log.warning("warning: %s:%d: ignoring an incomplete last line (a write cut short)", path, n)
                break
            raise RecordsError(f"{path}:{n}: not a JSON line ({e.msg})") from None
        if not isinstance(r, dict) or not isinstance(r.get("epoch"), (int, float)) or \
                isinstance(r.get("epoch"), bool) or not isinstance(r.get("step", 0), int):
            raise RecordsError(f"{path}:{n}: not a dpcnn metrics record (no number 'epoch')")
        records.append(Record.from_dict({"step": 0, **r}))
    return records


@dataclass
class Interval:
    """Training totals since the last record, and where this process's time went."""

    loss: float = 0.0          # summed training loss   } over the global batches since the last
    correct: float = 0.0       # correct predictions    } record; carried in checkpoints (CARRIED)
    samples: int = 0           # samples                }
    trained: int = 0           # samples this process trained since then (for images/s)
    data: float = 0.0          # seconds reading batches, in forward/backward, allreduce, update:
    compute: float = 0.0       # the time of the steps, so images/s counts neither evaluations nor
    allreduce: float = 0.0     # checkpoint writes
    update: float = 0.0

    CARRIED = ("loss", "correct", "samples")

    def add(self, loss_sum: float, correct: int, samples: int, t_data: float, t_compute: float,
            t_allreduce: float, t_update: float) -> None:
        self.loss += loss_sum
        self.correct += correct
        self.samples += samples
        self.trained += samples
        self.data += t_data
        self.compute += t_compute
        self.allreduce += t_allreduce
        self.update += t_update

    @property
    def seconds(self) -> float:
        """Seconds spent in training steps since the last record."""
        return self.data + self.compute + self.allreduce + self.update

    def carried(self) -> dict:
        return {k: getattr(self, k) for k in self.CARRIED}

    @classmethod
    def from_carried(cls, d: dict) -> Interval:
        return cls(**{k: d.get(k, 0) for k in cls.CARRIED})

    def text(self) -> str:
        if not self.samples:
            return ""
        rate = self.trained / max(self.seconds, 1e-9)
        return f"loss {self.loss / self.samples:.4f} acc {100 * self.correct / self.samples:.1f}% {rate:.0f} img/s"


class Progress:
    """Rank 0's view of the loop: a tqdm bar on a terminal, else a log line every `every` steps."""

    def __init__(self, show: bool, total: int, initial: int, every: int, steps_per_epoch: int):
        self.every, self.spe, self.bar = every, steps_per_epoch, None
        if show and sys.stderr.isatty() and console_shows(logging.INFO):     # not with -q
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False)
            except ImportError:
                pass

    def update(self, step: int, iv: Interval) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if step % 10 == 0:
                self.bar.set_postfix_str(iv.text())
        elif step % self.every == 0:
            epoch, k = divmod(step - 1, self.spe)       # as Keras counts: epoch 1, batch k of the epoch
            log.info("epoch %d batch %d/%d (step %d)  %s", epoch + 1, k + 1, self.spe, step, iv.text())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Monitor:
    """Rank 0's console line for each record, and the warnings a record can give (once each).

    lr: the --lr flag's value; peak_lr: the rate it gives at the global batch `batch` (--lr-scaling);
    settled: the step from which a loss that stays at the level of guessing means a collapsed run (the
    end of the warm-up, and of the first epoch: a healthy run starts there)."""

    def __init__(self, lr: float, classes: int, batch: int | None = None, peak_lr: float | None = None,
                 settled: int = 0):
        self.lr, self.classes, self.batch, self.settled = lr, classes, batch, settled
        self.peak_lr = lr if peak_lr is None else peak_lr
        self.first_rate: float | None = None          # images/s of the first long enough interval
        self.warned_slow = self.warned_loss = self.warned_collapse = False
        self.guessing = False                         # the last record after `settled` was at chance level

    def show(self, r: Record, train_seconds: float) -> None:
        line = ""
        if r.train_loss is not None and r.train_accuracy is not None:
            line = f"train loss {r.train_loss:.4f} acc {100 * r.train_accuracy:.2f}%  "
        if r.val_loss is not None and r.val_accuracy is not None:
            line += f"val loss {r.val_loss:.4f} acc {100 * r.val_accuracy:.2f}%  "
        log.info("epoch %.2f step %d  %stest loss %.4f acc %.2f%%  %s img/s  %.1f s", r.epoch, r.step, line,
                 r.test_loss, 100 * (r.test_accuracy or 0), f"{r.images_per_second:.0f}" if r.images_per_second
                 else "-", r.elapsed_seconds)
        self.check_speed(r.images_per_second if train_seconds >= MIN_RATE_S else None)
        self.check_loss(r.train_loss)
        self.check_collapse(r.train_loss, r.step)

    def check_speed(self, rate: float | None) -> None:
        """Warn (once) when training runs far slower than this process's own first interval."""
        if not rate:
            return
        if self.first_rate is None:
            self.first_rate = rate
        elif rate < self.first_rate / SLOW and not self.warned_slow:
            self.warned_slow = True
            log.warning("warning: %.0f images/s, %.1fx slower than at the start of this run (%.0f): another program "
                        "is probably using the cores (see top); use fewer ranks than free cores, and --threads 1",
                        rate, self.first_rate / rate, self.first_rate)

    def check_loss(self, loss: float | None) -> None:
        """Warn (once) when the training loss is far above chance level, ln(classes): the model is
        confidently wrong, which a too high learning rate causes, before the loss becomes NaN or not."""
        chance = math.log(self.classes)
        if loss is not None and loss > 2 * chance and not self.warned_loss:
            self.warned_loss = True
            log.warning("warning: training loss %.3g, more than twice that of guessing (ln %d = %.2f): the "
                        "learning rate is probably too high for this data; try a smaller --lr (now %g)",
                        loss, self.classes, chance, self.lr)

    def check_collapse(self, loss: float | None, step: int) -> None:
        """Warn (once) when the training loss sits at chance level, ln(classes), at two records in a row
        after the warm-up: the network predicts the same for every image (often all its ReLUs died in a
        too large early step) and will not recover; the run only looks alive."""
        chance = math.log(self.classes)
        if loss is None or step < self.settled:
            return
        was, self.guessing = self.guessing, abs(loss - chance) <= COLLAPSED * chance
        if not (was and self.guessing) or self.warned_collapse:
            return
        self.warned_collapse = True
        batch = f" at a global batch of {self.batch}" if self.batch else ""
        log.warning("warning: training loss %.4f at step %d, the level of guessing (ln %d = %.2f): the run has "
                    "collapsed and learns nothing; a learning rate of %g%s is probably too high: try a smaller --lr "
                    "(now %g), a longer --warmup-epochs, or --large-batch", loss, step, self.classes, chance,
                    self.peak_lr, batch, self.lr)


class Board:
    """TensorBoard event files (written with tensorboardX) beside metrics.jsonl: the same records,
    as curves that `tensorboard --logdir runs` shows while the run goes on."""

    SCALARS = {"train_loss": "loss/train", "val_loss": "loss/val", "test_loss": "loss/test",
               "train_accuracy": "accuracy/train", "val_accuracy": "accuracy/val", "test_accuracy": "accuracy/test",
               "lr": "learning_rate", "images_per_second": "images_per_second"}

    @staticmethod
    def available() -> bool:
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            return False
        return True

    def __init__(self, directory: Path):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(directory))

    def write(self, r: Record) -> None:
        for name, tag in self.SCALARS.items():
            value = getattr(r, name)
            if value is not None:
                self.writer.add_scalar(tag, value, r.step)
        self.writer.flush()

    def progress(self, step: int, iv: Interval, lr: float) -> None:
        """The training curves between records, at the console's progress interval: the loss and
        accuracy since the last record, the learning rate and images/s (flushed at the next record)."""
        if iv.samples:
            self.writer.add_scalar("loss/train", iv.loss / iv.samples, step)
            self.writer.add_scalar("accuracy/train", iv.correct / iv.samples, step)
        self.writer.add_scalar("learning_rate", lr, step)
        if iv.seconds:
            self.writer.add_scalar("images_per_second", iv.trained / iv.seconds, step)

    def close(self) -> None:
        self.writer.close()
