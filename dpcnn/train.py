"""Train the CNN with synchronous data-parallel SGD, on one process or on P MPI ranks.

    python -m dpcnn.train                                   # one process, no MPI launcher needed
    mpirun -n 4 python -m dpcnn.train --epochs 8            # 4 ranks: same seed + global batch, same result
    srun --mpi=pmi2 python -m dpcnn.train --out runs/$SLURM_JOB_ID --resume auto   # Slurm

Every step, each rank computes the summed gradient of its slice of the global batch;
one in-place Allreduce(SUM) of the flat gradient buffer (which also carries the
loss, the correct count and a stop flag) adds them up; every rank divides by the
global batch size and applies the same SGD update (``dpcnn.step``), so the parameters
stay identical everywhere. Rank 0 logs, records metrics and writes checkpoints
(``dpcnn.rundir``); the validation samples (held out of the training split, ``--val-size``)
and the test set are evaluated by all ranks, a slice each, and reduced. best.h5 is chosen by
validation accuracy; the test set is recorded, never used to choose.

Exit status: 0 finished; 75 stopped by SIGTERM/SIGUSR1/Ctrl-C after writing a checkpoint
(run the same command again to continue); 69 a rank or node stopped responding (--timeout);
1 error; 2 bad command line.
"""

from __future__ import annotations

import json
import logging
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import h5py
import numpy as np

from . import __version__
from . import checkpoint as ckpt
from .cli import EXIT_ERROR, EXIT_OK, EXIT_STOPPED, UserError, entry_point, error_line, report_error, setup_logging
from .comm import Comm, CommError, LaunchError, SharedError, check_in_sync, check_same, get_comm, on_root
from .config import Config, Facts, config_json, parse_args
from .data import Augment, DataError, ShardedLoader, Split, default_data_path, holdout, micro_bounds, verify
from .idx import DownloadError, offline_message, prepare_dataset
from .malloc import keep_freed_memory
from .metrics import Evaluator
from .model import ModelSpec
from .node import blas_summary, hostname
from .optim import LARS, REFERENCE_BATCH, SGD, AdamW, Optimizer, Schedule, scaled_lr
from .process import Process, training_process
from .records import Board, Interval, Monitor, Progress, Record
from .rundir import Checkpointer, RunDir, default_run_dir, point_latest
from .step import Diverged, TrainStep
from .watchdog import StopRequest, Watchdog, ignore_echoes

log = logging.getLogger("dpcnn")



# ----------------------------------------------------------------------------- set-up


def ensure_data(cfg: Config, comm: Comm) -> Path:
    """The data file, prepared by rank 0 if missing while the others wait; validated on rank 0 first."""
    path = cfg.data or default_data_path(cfg.dataset)

    def check() -> Path:
        if not path.exists():
            if cfg.data is not None and cfg.data_source is None:
                # a file the user named is theirs to make: a typo must not become a fresh copy of MNIST
                raise DataError(f"--data {path}: no such file; prepare it first (python -m dpcnn.data prepare "
                                f"--out {path} ...), add --data-source DIR|URL to prepare {cfg.dataset} there, "
                                f"or leave out --data to use {default_data_path(cfg.dataset)}")
            log.info("%s not found: preparing %s", path, cfg.dataset)
            try:
                prepare_dataset(cfg.dataset, cfg.data_source, path, source_flag="--data-source", out_flag="--data")
            except DownloadError as e:
                log.debug("%s", e)
                raise DataError(offline_message(cfg.dataset, e.offline, "the same command with --data-source DIR")) \
                    from None
            except DataError as e:
                raise DataError(f"cannot prepare {path}: {e}") from None
        if not verify(path):
            with Split(path, "train") as s:
                log.warning("warning: %s: not verified (its arrays have no SHA-256: made by an older dpcnn); "
                            "preparing it again adds them: %s", path, s.remake)
        with Split(path, "train") as tr, Split(path, "test") as te:
            if te.n == 0:
                raise DataError(f"{path}: the test split is empty; nothing to evaluate on")
            if (te.image_shape, te.channels, te.num_classes) != (tr.image_shape, tr.channels, tr.num_classes):
                raise DataError(f"{path}: test images {te.image_shape + (te.channels,)} in {te.num_classes} "
                                f"classes, training images {tr.image_shape + (tr.channels,)} in {tr.num_classes}")
            if cfg.shift >= min(tr.image_shape):
                raise DataError(f"--shift {cfg.shift}: the images of {path} are {tr.image_shape[0]}x"
                                f"{tr.image_shape[1]}; expected a shift of fewer pixels than that (2 suits MNIST)")
            try:
                model_spec(cfg, tr)
            except ValueError as e:
                raise DataError(f"{path}: its {tr.image_shape[0]}x{tr.image_shape[1]} images do not fit the "
                                f"model of --channels/--kernel/--hidden ({e})") from None
        return path

    return on_root(comm, check, "checking the data")


def settle_validation(cfg: Config, comm: Comm, path: Path) -> Config:
    """cfg with --val-size settled for the data (default_val_size of its training split), checked on
    rank 0 to leave at least one global batch of training samples."""

    def check() -> int:
        with Split(path, "train") as tr:
            v = cfg.with_val_size(tr.n).val_size or 0
            need = 1 if cfg.keep_last else cfg.batch_size
            if tr.n < need or (tr.n - v < need and cfg.val_size is None):
                left = f" ({tr.n - v} once {v} are held out for validation)" if v else ""
                raise DataError(f"--batch-size {need}: the training split of {path} has {tr.n} samples{left}, fewer "
                                "than one global batch; give a smaller --batch-size (or --keep-last)")
            if tr.n - v < need:
                raise DataError(f"--val-size {v} leaves {max(tr.n - v, 0)} of the {tr.n} training samples of "
                                f"{path}, fewer than {'one' if cfg.keep_last else f'a batch of {need}'}; "
                                "give a smaller --val-size (0: none)")
            return v

    v = on_root(comm, check, "counting the training samples")
    return cfg if cfg.val_size is not None else cfg.replace(val_size=v)


def choose_run_dir(cfg: Config, data_path: Path, threads: int) -> tuple[Path, bool]:
    """Without --out: runs/<dataset>-NNN, or the stopped newest run if it had these settings (the
    ones a resume must share, the model and the data file); see rundir.default_run_dir."""
    with Split(data_path, "train") as s:
        dataset = s.dataset

    def same(d: Path) -> bool:
        try:
            saved = json.loads((d / "config.json").read_text())
        except (OSError, ValueError):
            return False
        mine = cfg.to_dict()
        return isinstance(saved, dict) and not ckpt.resume_conflicts(cfg, threads, saved) and \
            saved.get("data") == str(data_path.absolute()) and saved.get("dataset") == dataset and \
            all(saved.get(k) == mine[k] for k in ("channels", "kernel", "hidden"))

    return default_run_dir(dataset, same)


def model_spec(cfg: Config, train_set: Split) -> ModelSpec:
    """The model of cfg for the data: its input (H, W, C) and classes come from the data file."""
    return ModelSpec(input_shape=train_set.image_shape + (train_set.channels,), channels=cfg.channels,
                     kernel=cfg.kernel, hidden=cfg.hidden, classes=train_set.num_classes)


# The recipe of --large-batch, chosen by measurement on MNIST at global batches 16 to 4,096 (README,
# "Learning at scale"). Above the reference batch of 64: --lr scaled by sqrt(B / 64), LARS (trust 0.12,
# its default) and a warm-up of 2 epochs; linear scaling at the same trust collapsed at 4,096, and
# plain SGD at any scaled rate collapsed at 1,024. At 64 or below: SGD with --lr scaled linearly, the
# same rate per sample as at 64 (LARS there learnt more slowly).
LARGE_BATCH = {"lr_scaling": "sqrt", "optimizer": "lars", "warmup_epochs": 2.0}
SMALL_BATCH = {"lr_scaling": "linear"}


def large_batch_recipe(cfg: Config) -> Config:
    """cfg with --large-batch spelt out, so that config.json and the resume rules see what runs: each
    setting of LARGE_BATCH (SMALL_BATCH at a global batch of REFERENCE_BATCH or less) that the run left
    at its default takes the recipe's value."""
    if not cfg.large_batch:
        return cfg
    recipe = LARGE_BATCH if cfg.batch_size > REFERENCE_BATCH else SMALL_BATCH
    default = Config()
    return cfg.replace(**{k: v for k, v in recipe.items() if getattr(cfg, k) == getattr(default, k)})


def make_schedule(cfg: Config, steps_per_epoch: int, total_steps: int) -> Schedule:
    """The learning rate of every step: --lr (scaled to the global batch by --lr-scaling), the warm-up and
    the schedule."""
    milestones = tuple(int(round((m * cfg.epochs if m < 1 else m) * steps_per_epoch)) for m in cfg.milestones)
    lr = scaled_lr(cfg.lr, cfg.batch_size, cfg.lr_scaling)
    return Schedule(cfg.schedule, lr, total_steps, warmup_steps=int(round(cfg.warmup_epochs * steps_per_epoch)),
                    milestones=milestones, gamma=cfg.gamma)


def make_optimizer(cfg: Config, model) -> Optimizer:
    """The optimizer of --optimizer for the model's flat vectors; LARS gets each weight and bias as a layer."""
    nesterov = cfg.nesterov and cfg.momentum > 0
    if cfg.optimizer == "adamw":
        return AdamW(model.params, model.grads, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return SGD(model.params, model.grads, cfg.momentum, nesterov, cfg.weight_decay)
    ends = np.cumsum([0] + [int(np.prod(shape)) for _, shape in model.shapes])
    layers = [slice(int(a), int(b)) for a, b in zip(ends[:-1], ends[1:], strict=True)]
    return LARS(model.params, model.grads, layers, cfg.momentum, nesterov, cfg.weight_decay, cfg.trust)


def run_facts(cfg: Config, c: Comm, data_path: Path, train_set: Split, loader: ShardedLoader, spec: ModelSpec,
              threads: int) -> Facts:
    """What the run is made of (config.json, checkpoints); allgathers the host names."""
    return Facts(data=str(data_path.absolute()), dataset=train_set.dataset, data_fingerprint=train_set.fingerprint,
                 preprocessing=train_set.preprocessing,
                 train_samples=loader.n, drop_last=not cfg.keep_last, steps_per_epoch=loader.steps_per_epoch,
                 total_steps=cfg.epochs * loader.steps_per_epoch, model=spec.to_dict(), num_params=spec.num_params,
                 world_size=c.size, nodes=c.num_nodes, hosts=sorted(set(c.allgather_obj(hostname()))),
                 threads_per_rank=threads, blas=blas_summary(), versions=versions(c))


def versions(comm: Comm) -> dict:
    v = {"dpcnn": __version__, "python": platform.python_version(), "numpy": np.__version__,
         "h5py": h5py.__version__}
    return {**v, **comm.versions()}


class Recorder:
    """A run's records: the evaluations at its record points (epoch ends, --eval-every), the best
    accuracy so far, the training totals since the last record, and where records go (rank 0:
    metrics.jsonl, TensorBoard, the console)."""

    def __init__(self, cfg: Config, comm: Comm, run_dir: RunDir, steps_per_epoch: int, classes: int):
        self.cfg, self.comm, self.run_dir, self.spe = cfg, comm, run_dir, steps_per_epoch
        self.records: list[Record] = []
        self.best_accuracy = -1.0
        self.iv = Interval()
        self.evaluator: Evaluator | None = None          # set once the weights are in place
        self.monitor = Monitor(cfg.lr, classes, cfg.batch_size, scaled_lr(cfg.lr, cfg.batch_size, cfg.lr_scaling),
                               settled=max(int(round(cfg.warmup_epochs * steps_per_epoch)), steps_per_epoch))
        self.board = Board(run_dir.tensorboard) if cfg.tensorboard and comm.is_root else None

    def scheduled(self, step: int) -> bool:
        """Whether the run records at this step wherever it ends: an epoch's end or --eval-every."""
        return step % self.spe == 0 or bool(self.cfg.eval_every and step % self.cfg.eval_every == 0)

    def recorded(self, step: int) -> bool:
        return bool(self.records) and self.records[-1].step == step

    def dicts(self) -> list[dict]:
        return [r.to_dict() for r in self.records]

    def since_best(self) -> int:
        """How many records came after the best one (0: the newest record is the best so far)."""
        best, since = -1.0, 0
        for r in self.records:
            best, since = (r.selection_accuracy, 0) if r.selection_accuracy > best else (best, since + 1)
        return since

    def exhausted(self) -> bool:
        """--patience N: the last N records brought no better validation accuracy: the run ends."""
        return bool(self.cfg.patience and self.records) and self.since_best() >= self.cfg.patience

    def restore(self, s: ckpt.State, continuing: bool) -> None:
        """The records, best accuracy and training totals of a checkpoint; continuing past it, a
        --max-steps end's record is dropped: the uninterrupted run does not make it."""
        self.records = [Record.from_dict(m) for m in s.metrics]
        if continuing and self.recorded(s.step) and not self.scheduled(s.step):
            self.records.pop()
        if continuing and self.records and self.records[-1].final:   # the end of a part, not of the run
            self.records[-1].final = False
        self.best_accuracy, self.iv = s.best_accuracy, Interval.from_carried(s.interval)

    def done(self, step: int, elapsed: float) -> None:
        """Rank 0's last line: where the run ended."""
        if self.comm.is_root:
            last = self.records[-1]
            val = "" if last.val_accuracy is None else f"validation accuracy {100 * last.val_accuracy:.2f}%, "
            log.info("done: %d step%s, %stest accuracy %.2f%%, %.1f s", step, "s"[:step != 1], val,
                     100 * (last.test_accuracy or 0), elapsed)

    def record(self, model, step: int, lr: float, elapsed: float, final: bool) -> Record:
        """Evaluate on the validation and test sets (all ranks) and, on rank 0, append the Record to
        metrics.jsonl and show it. SharedError (every rank) when a loss is not finite."""
        assert self.evaluator is not None
        t0 = time.perf_counter()
        val, test = self.evaluator(model)
        t_eval = time.perf_counter() - t0
        for what, t in (("validation", val), ("test", test)):
            if t is not None and not np.isfinite(t.loss):
                raise SharedError(f"training diverged in step {step}: the {what} loss after it is {t.loss}; nothing "
                                  f"of this step was saved (try a lower --lr than {self.cfg.lr:g}, or --warmup-epochs)")
        iv, n = self.iv, self.iv.samples
        rec = Record(
            epoch=round(step / self.spe, 4), step=step,
            train_loss=iv.loss / n if n else None, train_accuracy=iv.correct / n if n else None,
            val_loss=val.loss if val else None, val_accuracy=val.accuracy if val else None,
            test_loss=test.loss, test_accuracy=test.accuracy,
            test_per_class_accuracy=test.summary()["per_class_accuracy"],
            images_per_second=round(iv.trained / iv.seconds, 1) if iv.trained and iv.seconds else None,
            elapsed_seconds=round(elapsed, 3), world_size=self.comm.size, global_batch_size=self.cfg.batch_size,
            lr=lr, time_data_s=round(iv.data, 4), time_compute_s=round(iv.compute, 4),
            time_allreduce_s=round(iv.allreduce, 4), time_update_s=round(iv.update, 4),
            time_eval_s=round(t_eval, 4), final=final)
        self.records.append(rec)
        if self.exhausted() and not rec.final:                      # an early stop: the run's last record
            rec.final = True
            if self.comm.is_root:
                log.info("stopping early: no better %s accuracy in the last %d evaluations (--patience)",
                         "test" if rec.val_accuracy is None else "validation", self.cfg.patience)
        if self.comm.is_root:
            self.run_dir.append_metrics(rec.to_dict())
            if self.board is not None:
                self.board.write(rec)
            self.monitor.show(rec, iv.seconds)
        self.iv = Interval()
        return rec


# ----------------------------------------------------------------------------- the run


class Trainer:
    """One training run: the step (model, optimizer, buffer), the data, the position, the records."""

    def __init__(self, cfg: Config, comm: Comm, data_path: Path, run_dir: RunDir, threads: int, node_cpus: int,
                 stop: StopRequest, dog: Watchdog):
        self.cfg, self.comm, self.data_path, self.run_dir = cfg, comm, data_path, run_dir
        self.stop, self.dog = stop, dog
        self.threads, self.node_cpus = threads, node_cpus
        self.t_start = time.perf_counter()
        self.train_set, self.test_set = Split(data_path, "train"), Split(data_path, "test")
        self.spec = model_spec(cfg, self.train_set)
        self.unit = cfg.micro_batch if cfg.exact else 1     # what a rank computes whole: a micro-batch, or a sample
        # the validation rows, held out of the training split; training orders only the others
        train_rows, self.val_rows = holdout(self.train_set.n, cfg.val_size or 0, cfg.val_seed)
        augment = Augment(cfg.shift, cfg.rotate, cfg.seed, cfg.scale, cfg.elastic, cfg.elastic_sigma) \
            if cfg.shift or cfg.rotate or cfg.scale or cfg.elastic else None
        self.loader = ShardedLoader(self.train_set, batch_size=cfg.batch_size, rank=comm.rank, size=comm.size,
                                    seed=cfg.seed, drop_last=not cfg.keep_last, micro_batch=self.unit,
                                    subset=train_rows if cfg.val_size else None, augment=augment)
        self.steps_per_epoch = self.loader.steps_per_epoch
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.end_step = min(self.total_steps, cfg.max_steps or self.total_steps)
        self.facts = run_facts(cfg, comm, self.data_path, self.train_set, self.loader, self.spec, threads)
        check_same(comm, self.facts.shared(cfg))                     # distributed: before any other collective
        self.step_fn = TrainStep(self.spec, comm, micro_batch=cfg.micro_batch, exact=cfg.exact, seed=cfg.seed,
                                 momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
                                 init=cfg.init, overlap=cfg.overlap)
        self.model = self.step_fn.model
        self.step_fn.opt = make_optimizer(cfg, self.model)          # TrainStep's SGD, or LARS on the same vectors
        self.schedule = make_schedule(cfg, self.steps_per_epoch, self.total_steps)
        self.step = 0                            # updates done; the next batch is divmod(step, steps_per_epoch)
        self.elapsed0 = 0.0
        if cfg.tensorboard:
            on_root(comm, check_board, "checking TensorBoard")
        self.rec = Recorder(cfg, comm, run_dir, self.steps_per_epoch, self.spec.classes)
        self.resumed_from = self._resume()
        if self.resumed_from is None and cfg.init_from:
            self._init_from(cfg.init_from)
        self.rec.evaluator = Evaluator(self.train_set, self.val_rows, self.test_set, comm)
        self.board = self.rec.board
        self.ckpts = Checkpointer(run_dir, cfg.keep, cfg.checkpoint_every, cfg.checkpoint_minutes)

    # -- the loop ------------------------------------------------------------------

    def train(self) -> int:
        cfg, c, spe = self.cfg, self.comm, self.steps_per_epoch
        if self.step >= self.end_step or self.rec.exhausted():
            return self.at_the_end()
        if self.stopped_during_start_up():
            return EXIT_STOPPED
        announce(self)
        progress = Progress(c.is_root and cfg.progress, self.end_step, self.step,
                            cfg.log_every or max(spe // 10, 1), spe) if c.is_root else None
        self.dog.armed = True                                       # a stall from now on is named by its step
        while self.step < self.end_step:
            epoch, k = divmod(self.step, spe)
            stopping = self.train_step(epoch, k)
            s = self.step
            if progress:
                progress.update(s, self.rec.iv)
                if self.rec.board and s % progress.every == 0 and not self.rec.scheduled(s) and s < self.end_step:
                    self.rec.board.progress(s, self.rec.iv, self.schedule(s - 1))   # TensorBoard between records
            if cfg.check_every and s % cfg.check_every == 0:
                check_in_sync(c, self.model.params, s)
            # Records and checkpoints come before acting on a stop, so a stop never skips one.
            if k + 1 == spe or s == self.end_step:                  # an epoch or the run ended
                self.record_and_checkpoint(final=s == self.end_step, provisional=not self.rec.scheduled(s))
            elif self.rec.scheduled(s):                                 # --eval-every within an epoch
                self.record_and_checkpoint(final=False, only_if_best=True)
            if self.ckpts.due(s):
                self.save_checkpoint()
            self.dog.beat(s + 1)
            if self.rec.exhausted():                                # --patience: no better record in a row
                self.save_checkpoint()
                break
            if stopping and s < self.end_step:
                if progress:
                    progress.close()
                return self.stopped()
        if progress:
            progress.close()
        check_in_sync(c, self.model.params, self.step)
        self.rec.done(self.step, self.elapsed())
        return EXIT_OK

    def train_step(self, epoch: int, k: int) -> bool:
        """One synchronous step on global batch k of the epoch; True when some rank asked to stop."""
        t0 = time.perf_counter()
        x, y, M = self.loader.batch(epoch, k)
        t_data = time.perf_counter() - t0
        try:
            r = self.step_fn(x, y, M, self.schedule(self.step), stop=self.stop.signum != 0)
        except Diverged as e:
            self.diverged(self.step + 1, str(e))
        self.step += 1
        self.rec.iv.add(r.loss_sum, r.correct, r.samples, t_data, r.t_compute, r.t_allreduce, r.t_update)
        return r.stop

    def at_the_end(self) -> int:
        """Resumed at or past --max-steps, or after an early stop: record the end if no record is
        there yet, else nothing."""
        if self.rec.exhausted():
            if self.comm.is_root:
                log.info("the run in %s stopped early at step %d (--patience %d): nothing to train", self.run_dir.path,
                         self.step, self.cfg.patience)
        elif self.step == self.end_step and not self.rec.recorded(self.step):
            announce(self)
            self.record_and_checkpoint(final=True, provisional=not self.rec.scheduled(self.step))
            self.rec.done(self.step, self.elapsed())
        elif self.comm.is_root:
            log.info("the run in %s is at step %d of %d: nothing to train (a larger --max-steps continues "
                     "it up to --epochs; another --out starts a new run)", self.run_dir.path, self.step, self.end_step)
        return EXIT_OK

    def stopped_during_start_up(self) -> bool:
        """A stop signal on any rank before the first step: exit 75 with nothing new to save."""
        flag = np.array([1.0 if self.stop.signum else 0.0])
        self.comm.allreduce(flag)                                   # distributed: did any rank get one?
        if flag[0] and self.comm.is_root:
            log.warning("stop requested by signal during start-up, at step %d: nothing new to save; exiting "
                        "with status %d (run the same command again to continue)", self.step, EXIT_STOPPED)
        return bool(flag[0])

    def stopped(self) -> int:
        if self.comm.is_root:
            log.warning("stop requested by signal: checkpoint at step %d, exiting with status %d "
                        "(run the same command again to continue)", self.step, EXIT_STOPPED)
        self.save_checkpoint()
        return EXIT_STOPPED

    def diverged(self, step: int, what: str):
        """Stop every rank (they all see the same reduced value) before non-finite weights are saved."""
        raise SharedError(f"training diverged in step {step}: {what}; nothing of this step was saved "
                          f"(try a lower --lr than {self.cfg.lr:g}, or --warmup-epochs)")

    def elapsed(self) -> float:
        return self.elapsed0 + time.perf_counter() - self.t_start

    # -- records -------------------------------------------------------------------

    def record_and_checkpoint(self, final: bool, only_if_best: bool = False, provisional: bool = False) -> None:
        """Evaluate and record, then checkpoint, also as best.h5 when the validation accuracy (the
        test accuracy without a validation split) improved; only_if_best (the evaluations of
        --eval-every within an epoch): checkpoint only then, so best.h5 is the best of every record.

        provisional: the record of a --max-steps end that the uninterrupted run would not make. It is
        written to metrics.jsonl and may be best.h5, but the step checkpoint keeps the best accuracy
        and training totals from before it, and a run continued from there drops it (``_resume``),
        so that it records exactly what the uninterrupted run records."""
        r = self.rec
        before = (r.best_accuracy, r.iv)
        rec = r.record(self.model, self.step, self.schedule(max(self.step - 1, 0)), self.elapsed(), final)
        best = rec.selection_accuracy > r.best_accuracy
        r.best_accuracy = max(r.best_accuracy, rec.selection_accuracy)
        if provisional:                         # best.h5 too keeps the totals and best from before the record
            r.best_accuracy, r.iv = before
            best_state = self.state() if best and self.comm.is_root else None
            self.save_checkpoint(best=best, best_state=best_state)
        elif best or not only_if_best:
            self.save_checkpoint(best=best)

    # -- checkpoints -----------------------------------------------------------------

    def state(self) -> ckpt.State:
        m = self.model
        epoch, next_batch = divmod(self.step, self.steps_per_epoch)
        return ckpt.State(
            params={k: v.copy() for k, v in m.p.items()},
            velocity={k: v.copy() for k, v in m.unflatten(self.step_fn.opt.velocity).items()},
            second=({k: v.copy() for k, v in m.unflatten(opt.second).items()}
                    if isinstance(opt := self.step_fn.opt, AdamW) else None),
            epoch=epoch, next_batch=next_batch, step=self.step, spec=self.spec.to_dict(),
            config={**self.cfg.to_dict(), **asdict(self.facts)}, data_fingerprint=self.train_set.fingerprint,
            metrics=self.rec.dicts(), best_accuracy=self.rec.best_accuracy, elapsed=self.elapsed(),
            world_size=self.comm.size, interval=self.rec.iv.carried())

    def save_checkpoint(self, best: bool = False, best_state: ckpt.State | None = None) -> None:
        """Rank 0 writes ckpt-stepN.h5 (and best.h5, of best_state if given); once per step."""
        if self.comm.is_root:
            with self.dog.busy("writing a checkpoint"):               # a stall here names rank 0 and the write
                self.ckpts.save(self.step, self.state, bool(np.isfinite(self.model.params).all()), best, best_state)

    def _resume(self) -> str | None:
        """Load the checkpoint --resume names (rank 0 reads it; everyone gets the state)."""

        def check(state: ckpt.State, path: Path) -> None:
            ckpt.check_compatible(state, path, self.spec, self.train_set, self.loader.n, self.cfg, self.threads)

        found = on_root(self.comm, lambda: self.run_dir.find_resume(self.cfg.resume, check),
                        "reading the checkpoint to resume from")
        if found is None:
            return None
        path, s = found
        opt = self.step_fn.opt
        if isinstance(opt, AdamW):                      # its second moment and update count
            if s.second is None:
                raise ckpt.CheckpointError(f"{path}: holds no second moment for --optimizer adamw")
            opt.t = s.step
            for name, v in self.model.unflatten(opt.second).items():
                v[...] = s.second[name]
        for vec, saved in ((self.model.params, s.params), (self.step_fn.opt.velocity, s.velocity)):
            for name, v in self.model.unflatten(vec).items():
                v[...] = saved[name]
        self.step, self.elapsed0 = s.step, s.elapsed
        self.rec.restore(s, continuing=self.step < self.end_step)
        if self.comm.is_root:
            epoch, done = divmod(s.step, self.steps_per_epoch)
            where = (f"the end of epoch {epoch}" if done == 0 and epoch else
                     f"epoch {epoch + 1}, {done} of {self.steps_per_epoch} batches done")
            log.info("resuming from %s at step %d (%s; saved on %d rank(s))", path, s.step, where, s.world_size)
        return str(path)

    def _init_from(self, path: Path) -> None:
        """Start from the weights of the checkpoint at path (rank 0 reads it; every rank gets them):
        a new run, with zero momentum, its own schedule and step 0. A model that differs is refused."""
        params, what = on_root(self.comm, lambda: ckpt.load_init(path, self.spec, self.train_set.fingerprint),
                               "reading --init-from")
        for name, v in self.model.p.items():
            v[...] = params[name]
        if self.comm.is_root:
            log.info("starting from the weights of %s (%s)", path, what)


def announce(t: Trainer) -> None:
    """Rank 0 writes config.json and the records the run starts from, and logs what runs where."""
    if t.comm.is_root:
        t.run_dir.write_metrics(t.rec.dicts())                          # what its checkpoint knew
        t.run_dir.write_config(config_json(t.cfg, t.facts, t.resumed_from))
        point_latest(t.run_dir.path)                                    # runs/latest: the newest run in runs/
        log_start(t)
    t.comm.barrier()


def log_start(t: Trainer) -> None:
    """Rank 0's lines on what runs where, and the warnings about it, at the start of training."""
    c, cfg = t.comm, t.cfg
    m, B = t.unit, cfg.batch_size
    sizes = [hi - lo for lo, hi in (micro_bounds(B, m, r, c.size) for r in range(c.size))]
    per_rank = f"{min(sizes)}" if min(sizes) == max(sizes) else f"{min(sizes)}-{max(sizes)}"
    log.info("dpcnn %s: %d rank(s) on %d node(s), %d BLAS thread(s) per rank, BLAS %s%s",
             __version__, c.size, c.num_nodes, t.threads, t.facts.blas,
             f", {t.facts.versions.get('mpi', '')}" if c.size > 1 else "")
    log.info("data %s (%d train, %d validation, %d test); model %s params; global batch %d (%s per rank); "
             "%d steps/epoch, %d epoch%s; run dir %s", t.data_path, t.loader.n, len(t.val_rows), t.test_set.n,
             f"{t.spec.num_params:,}", B, per_rank, t.steps_per_epoch, cfg.epochs, "s"[:cfg.epochs != 1],
             t.run_dir.path)
    if cfg.exact:
        log.info("--exact: micro-batches of %d, exact sums: the same bits on any number of ranks", m)
    parts = [f"shifts of up to {cfg.shift} pixel(s)" if cfg.shift else "",
             f"rotations of up to {cfg.rotate:g} degrees" if cfg.rotate else "",
             f"zooms of up to {100 * cfg.scale:g}%" if cfg.scale else "",
             f"elastic distortions of {cfg.elastic:g} pixels (sigma {cfg.elastic_sigma:g})" if cfg.elastic else ""]
    if any(parts):
        log.info("augmentation: random %s", ", ".join(p for p in parts if p))
    if min(sizes) == 0:
        log.warning("warning: %d of %d rank(s) get no samples: a global batch of %d holds %d micro-batch(es) "
                    "of %d; raise --batch-size or lower --micro-batch", sizes.count(0), c.size, B, -(-B // m), m)
    if t.threads * c.local_size > t.node_cpus:
        log.warning("warning: %d rank(s) x %d thread(s) on a node with %d usable CPUs: oversubscribed",
                    c.local_size, t.threads, t.node_cpus)


def check_board() -> None:
    if not Board.available():
        raise UserError("--tensorboard needs tensorboardX: pip install 'dpcnn[tensorboard]'")


def train(cfg: Config, comm: Comm | None = None) -> int:
    """Train with `cfg` on `comm` (default: MPI under a launcher, else one process); the exit status.

    Errors a user can fix raise a UserError (SharedError when every rank knows it). The process
    set-up (``training_process``: console logging if the program has none, the stop-signal
    handlers from the main thread, the stall watchdog, BLAS threads) comes first, so that a signal
    or a stall during a long start-up is not lost, and it is undone on return."""
    comm = comm or get_comm(cfg.comm)
    with training_process(comm, cfg.timeout, cfg.threads) as proc:
        return run(cfg, proc)


def run(cfg: Config, proc: Process) -> int:
    """train() in a process set up by training_process(): every collective here is watched."""
    comm, dog = proc.comm, proc.dog
    node_cpus = comm.node_cpus()                                     # collective on the node
    data_path = ensure_data(cfg, comm)
    cfg = large_batch_recipe(settle_validation(cfg, comm, data_path))
    out, created = cfg.out, False
    if out is None:                                                  # a new run, or the stopped one to continue
        out, created = on_root(comm, lambda: choose_run_dir(cfg, data_path, proc.threads), "choosing the run directory")
        cfg = cfg.replace(out=out)
    run_dir = RunDir(out, created)
    on_root(comm, run_dir.open, "taking the run directory")          # rank 0 holds the directory's lock
    dog.status_file = run_dir.exit_status                            # where the chosen status is recorded
    logfile = run_dir.attach_log() if comm.is_root else None         # train.log: the console, with times
    try:
        trainer = Trainer(cfg, comm, data_path, run_dir, proc.threads, node_cpus, proc.stop, dog)
        try:
            code = trainer.train()
            dog.finish(code)                                         # 0 or 75 in exit-status, unless a stall won
            return code
        finally:
            if trainer.board is not None:
                trainer.board.close()
    except BaseException as e:                                       # the error line goes to the log too
        if logfile is not None:
            logfile.emit(logging.makeLogRecord({"msg": f"error: {error_line(e)}", "levelno": logging.ERROR}))
        raise
    finally:
        if logfile is not None:
            logging.getLogger().removeHandler(logfile)
            logfile.close()
        run_dir.close()


@entry_point
def main(argv=None) -> int:
    cfg, console = parse_args(argv, description=__doc__.split("\n\n")[0])
    keep_freed_memory()                        # every step reuses, not re-faults, its temporaries
    try:
        comm = get_comm(cfg.comm)
    except CommError as e:
        report_error(e, console.debug)
        if isinstance(e, LaunchError):
            e.end_launch(EXIT_ERROR)           # the launcher's other ranks wait for this one in MPI_Init
        return EXIT_ERROR
    setup_logging(console.verbose, console.quiet, comm.rank)
    try:
        code = train(cfg, comm)
        if code == EXIT_STOPPED:
            ignore_echoes()                    # the launcher's copies of the stop signal, while exiting
        return code
    except SharedError as e:                   # every rank knows: only rank 0 speaks, all exit together
        if comm.is_root:
            log.error("error: %s", e)
        return EXIT_ERROR
    except (Exception, KeyboardInterrupt) as e:
        report_error(e, console.debug, prefix=f"rank {comm.rank}: " if comm.size > 1 else "")
        if comm.size > 1:
            comm.abort(EXIT_ERROR)             # end every rank now, none left waiting in a collective
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
