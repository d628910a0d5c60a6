"""Train the CNN with synchronous data-parallel SGD, on one process or on P MPI ranks.

    python -m dpcnn.train                                   # one process, no MPI launcher needed
    mpirun -n 4 python -m dpcnn.train --epochs 8            # 4 ranks: same seed + global batch, same result
    srun --mpi=pmi2 python -m dpcnn.train --out runs/$SLURM_JOB_ID --resume auto   # Slurm

Every step, each rank computes the summed gradient of its slice of the global batch;
one in-place Allreduce(SUM) of the flat gradient buffer (which also carries the
loss, the correct count and a stop flag) adds them up; every rank divides by the
global batch size and applies the same SGD update, so the parameters stay
identical everywhere. Rank 0 logs, records metrics and writes checkpoints; the
test set is evaluated by all ranks, a slice each, and reduced.

Exit status: 0 finished; 75 stopped by SIGTERM/SIGUSR1/Ctrl-C after writing a checkpoint
(run again with --resume auto); 1 error; 2 bad command line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import signal
import sys
import time
from pathlib import Path

import h5py
import numpy as np
from threadpoolctl import threadpool_limits

from . import __version__
from . import checkpoint as ckpt
from .cli import (UserError, add_common_flags, entry_point, error_line, int_list, nonneg_float, nonneg_int,
                  positive_int, report_error, setup_logging)
from .comm import CommError, blas_summary, default_threads, get_comm, hostname
from .data import (DATASETS, DataError, ShardedLoader, Split, WriteError, default_data_path, prepare, shard_bounds,
                   temp_name)
from .malloc import keep_freed_memory
from .metrics import Totals, evaluate
from .model import CNN, ModelSpec
from .optim import SCHEDULES, SGD, Schedule

log = logging.getLogger("dpcnn")

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_STOPPED = 0, 1, 2, 75
CARRIED = ("loss", "correct", "samples")      # interval totals a checkpoint carries across a resume


class SharedError(UserError):
    """An error every rank has learned about (from rank 0): all exit together, no abort needed."""


# ----------------------------------------------------------------------------- command line

EPILOG = """\
examples:
  python -m dpcnn.train                                  MNIST, defaults, one process
  python -m dpcnn.train --data-source ~/datasets/mnist      prepare from local IDX files if needed
  mpirun -n 4 python -m dpcnn.train --epochs 8 --out runs/four
  python -m dpcnn.train --max-steps 200 --eval-every 100 --out runs/quick
  srun --mpi=pmi2 python -m dpcnn.train --out runs/$SLURM_JOB_ID --resume auto
  python -m dpcnn.train --dataset fashion-mnist --epochs 15

exit status: 0 done, 75 stopped by SIGTERM/SIGUSR1/Ctrl-C with a checkpoint written
(resume with --resume auto), 1 error, 2 bad command line.
"""


def float_list(s: str) -> tuple[float, ...]:
    try:
        v = tuple(float(t) for t in s.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None
    if not all(0 < t < float("inf") for t in v):
        raise argparse.ArgumentTypeError(f"expected finite numbers > 0, got {s!r}")
    return v


def unit_interval(s: str) -> float:
    v = float(s)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {s}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dpcnn.train", description=__doc__.split("\n\n")[0],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", type=Path, help="prepared HDF5 file (default data/<dataset>.h5); "
                                             "rank 0 prepares it if missing")
    d.add_argument("--dataset", default="mnist", choices=sorted(DATASETS), help="data set (default mnist)")
    d.add_argument("--data-source", help="where to prepare a missing data file from: a directory with "
                                         "the IDX files or a base URL (default: public mirrors)")
    d.add_argument("--keep-last", action="store_true",
                   help="use the last partial global batch of each epoch (default: drop it)")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=positive_int, default=8, help="epochs (default 8)")
    t.add_argument("--batch-size", type=positive_int, default=64,
                   help="GLOBAL batch size, split across ranks (default 64)")
    t.add_argument("--lr", type=nonneg_float, default=0.05, help="peak learning rate (default 0.05)")
    t.add_argument("--momentum", type=unit_interval, default=0.9, help="SGD momentum, 0 <= m < 1 (default 0.9)")
    t.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=True,
                   help="Nesterov momentum (default on)")
    t.add_argument("--weight-decay", type=nonneg_float, default=5e-4, help="L2 weight decay (default 5e-4)")
    t.add_argument("--schedule", choices=SCHEDULES, default="cosine", help="learning-rate schedule (default cosine)")
    t.add_argument("--warmup-epochs", type=nonneg_float, default=0.0, help="linear warm-up epochs (default 0)")
    t.add_argument("--milestones", type=float_list, default=(0.5, 0.75),
                   help="for --schedule step: when to multiply the rate by --gamma, as fractions of "
                        "the run if < 1 else epochs (default 0.5,0.75)")
    t.add_argument("--gamma", type=nonneg_float, default=0.1, help="step schedule factor (default 0.1)")
    t.add_argument("--seed", type=nonneg_int, default=0,
                   help="seed of the initial weights and sample order (default 0)")
    t.add_argument("--max-steps", type=positive_int, help="stop after this many updates (still evaluates, "
                                                          "records and checkpoints)")
    m = p.add_argument_group("model")
    m.add_argument("--channels", type=int_list, default=(8, 16), help="filters per conv block (default 8,16)")
    m.add_argument("--kernel", type=positive_int, default=3, help="conv kernel size (default 3)")
    m.add_argument("--hidden", type=int_list, default=(128,), help="dense hidden widths (default 128)")
    r = p.add_argument_group("run directory, evaluation, checkpoints")
    r.add_argument("--out", type=Path, default=Path("runs/latest"), help="run directory (default runs/latest)")
    r.add_argument("--eval-every", type=nonneg_int, default=0,
                   help="also evaluate every N steps (default 0: at each epoch's end only)")
    r.add_argument("--checkpoint-every", type=nonneg_int, default=0,
                   help="also checkpoint every N steps (default 0: at epoch ends only)")
    r.add_argument("--checkpoint-minutes", type=nonneg_float, default=0.0,
                   help="also checkpoint when this many minutes passed since the last one (default 0: off)")
    r.add_argument("--keep", type=positive_int, default=3, help="step checkpoints to keep (default 3; "
                                                                "best.h5 is kept besides)")
    r.add_argument("--resume", default="auto",
                   help="'auto' (newest valid checkpoint in --out, if any), 'none', or a checkpoint path "
                        "(default auto)")
    s = p.add_argument_group("parallelism")
    s.add_argument("--threads", type=positive_int,
                   help="BLAS threads per rank (default: the node's cores / ranks on the node)")
    s.add_argument("--comm", choices=("auto", "mpi", "serial"), default="auto",
                   help="communicator (default auto: MPI when started by an MPI launcher)")
    s.add_argument("--check-every", type=nonneg_int, default=500,
                   help="verify every N steps that all ranks hold identical parameters (default 500)")
    s.add_argument("--log-every", type=nonneg_int, default=0, help="log a line every N steps (default: ~10 an epoch)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    add_common_flags(p)
    return p


# ----------------------------------------------------------------------------- signals


class StopRequest:
    """SIGTERM, SIGUSR1 and SIGINT (Ctrl-C, which mpiexec forwards to every rank) set a flag
    that the ranks agree on at the next step boundary.

    A second signal ends the process at once (status 128 + signal number).
    """

    SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGUSR1", "SIGINT") if hasattr(signal, n))

    def __init__(self):
        self.signum = 0
        self._old = {}

    def install(self):
        for s in self.SIGNALS:
            self._old[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self):
        for s, h in self._old.items():
            signal.signal(s, h)

    def _handle(self, signum, frame):
        if self.signum:
            os.write(2, f"second signal {signum}: exiting now without a checkpoint\n".encode())
            os._exit(128 + signum)
        self.signum = signum


# ----------------------------------------------------------------------------- set-up


def on_root(comm, check):
    """Run check() on rank 0 while the others wait; every rank gets its result, or its error as a
    SharedError (so one message is printed and all ranks exit together)."""
    result = err = None
    if comm.is_root:
        try:
            result = check()
        except UserError as e:
            err = error_line(e)
    result, err = comm.bcast_obj((result, err))
    if err:
        raise SharedError(err)
    return result


def ensure_data(args, comm) -> Path:
    """The data file, prepared by rank 0 if missing while the others wait; validated on rank 0 first."""
    path = Path(args.data) if args.data else default_data_path(args.dataset)

    def check() -> Path:
        if not path.exists():
            log.info("%s not found: preparing %s", path, args.dataset)
            try:
                prepare(args.dataset, args.data_source, path)
            except DataError as e:
                src = f" --source {args.data_source}" if args.data_source else " --source DIR"
                raise DataError(f"{e}. Prepare it from local IDX files with: python -m dpcnn.data "
                                f"prepare --dataset {args.dataset}{src} --out {path}") from None
        with Split(path, "train") as tr, Split(path, "test") as te:
            if te.n == 0:
                raise DataError(f"{path}: the test split is empty; nothing to evaluate on")
            if (te.image_shape, te.num_classes) != (tr.image_shape, tr.num_classes):
                raise DataError(f"{path}: test images {te.image_shape} in {te.num_classes} classes, training "
                                f"images {tr.image_shape} in {tr.num_classes}")
            try:
                model_spec(args, tr)
            except ValueError as e:
                raise DataError(f"{path}: its {tr.image_shape[0]}x{tr.image_shape[1]} images do not fit the "
                                f"model of --channels/--kernel/--hidden ({e})") from None
        return path

    return on_root(comm, check)


def model_spec(args, train_set: Split) -> ModelSpec:
    return ModelSpec(input_shape=train_set.image_shape + (1,), channels=args.channels, kernel=args.kernel,
                     hidden=args.hidden, classes=train_set.num_classes)


def prepare_run_dir(path: Path) -> None:
    """Create the run directory, check that files can be written there, and remove the temporary
    files of an earlier process that was killed while writing (rank 0)."""
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--out {path}: cannot write there ({e.strerror or e})") from None
    for stale in path.glob(".*.tmp*"):
        if stale.name.startswith((".ckpt-step", ".best.h5", ".metrics.jsonl", ".config.json")):
            log.debug("removing %s, left by an interrupted write", stale)
            stale.unlink(missing_ok=True)


def versions(comm) -> dict:
    v = {"dpcnn": __version__, "python": platform.python_version(), "numpy": np.__version__,
         "h5py": h5py.__version__}
    return {**v, **comm.versions()}


def params_digest(params: np.ndarray) -> str:
    return hashlib.blake2b(params.tobytes(), digest_size=16).hexdigest()


def eval_shard(test: Split, comm) -> tuple[np.ndarray, np.ndarray]:
    """This rank's contiguous slice of the test set: every test sample counted exactly once."""
    lo, hi = shard_bounds(test.n, comm.rank, comm.size)
    return test.read(lo, hi)


def evaluate_shared(model, xt, yt, comm) -> Totals:
    """Evaluate each rank's test slice and add the totals up on every rank."""
    a = evaluate(model, xt, yt).as_array()
    comm.allreduce(a)
    return Totals.from_array(a, model.spec.classes)


def make_schedule(args, steps_per_epoch: int, total_steps: int) -> Schedule:
    milestones = tuple(int(round((m * args.epochs if m < 1 else m) * steps_per_epoch)) for m in args.milestones)
    return Schedule(args.schedule, args.lr, total_steps, warmup_steps=int(round(args.warmup_epochs * steps_per_epoch)),
                    milestones=milestones, gamma=args.gamma)


def write_text(path: Path, text: str, append: bool = False) -> None:
    """Write (atomically: temporary file, rename) or append text; WriteError naming the file."""
    tmp = temp_name(path, ".tmp")
    try:
        if append:
            with open(path, "a") as f:
                f.write(text)
        else:
            tmp.write_text(text)
            os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WriteError(f"{path}: could not write it ({e.strerror or e})") from None


# ----------------------------------------------------------------------------- the run


class Run:
    """One training run: model, optimizer, data, position in the sample order, and the bookkeeping."""

    def __init__(self, args, comm):
        self.args, self.comm = args, comm
        self.t_start = time.perf_counter()
        self.node_cpus = comm.node_cpus()                    # collective on the node
        self.threads = args.threads or default_threads(comm, self.node_cpus)
        threadpool_limits(self.threads)                      # BLAS threads of this process from now on
        self.data_path = ensure_data(args, comm)
        self.run_dir = Path(args.out)
        on_root(comm, lambda: prepare_run_dir(self.run_dir))
        self.train_set, self.test_set = Split(self.data_path, "train"), Split(self.data_path, "test")
        ts = self.train_set
        self.spec = model_spec(args, ts)
        self.loader = ShardedLoader(ts, batch_size=args.batch_size, rank=comm.rank, size=comm.size,
                                    seed=args.seed, drop_last=not args.keep_last)
        self.steps_per_epoch = self.loader.steps_per_epoch
        self.total_steps = args.epochs * self.steps_per_epoch
        self.end_step = min(self.total_steps, args.max_steps or self.total_steps)

        self.hosts = comm.allgather_obj(hostname())
        self.config = self._config()
        self._check_same_settings()                           # before any collective that depends on them

        n = self.spec.num_params
        self.buf = np.zeros(n + 3, dtype=np.float32)    # [gradients..., loss sum, correct, stop flag]
        self.n = n
        self.model = CNN(self.spec, seed=args.seed, grads=self.buf[:n])
        comm.bcast(self.model.params)                         # every rank starts from rank 0's weights
        self.opt = SGD(self.model.params, self.model.grads, momentum=args.momentum,
                       nesterov=args.nesterov and args.momentum > 0, weight_decay=args.weight_decay)
        self.schedule = make_schedule(args, self.steps_per_epoch, self.total_steps)

        self.step = 0                            # updates done; the next batch is divmod(step, steps_per_epoch)
        self.saved_step = None                   # step of the last checkpoint this process wrote
        self.metrics, self.best_accuracy, self.elapsed0 = [], -1.0, 0.0
        self._reset_interval()
        self.resumed_from = self._resume()
        self.xt, self.yt = eval_shard(self.test_set, comm)
        self.stop = StopRequest()
        self.last_ckpt_time = time.monotonic()

    def _config(self) -> dict:
        a, c = self.args, self.comm
        cfg = {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
               for k, v in vars(a).items() if k not in ("verbose", "quiet", "debug", "no_progress")}
        cfg.update(data=str(self.data_path), dataset=self.train_set.dataset, drop_last=not a.keep_last,
                   world_size=c.size, nodes=c.num_nodes, hosts=sorted(set(self.hosts)), threads_per_rank=self.threads,
                   blas=blas_summary(), model=self.spec.to_dict(), num_params=self.spec.num_params,
                   steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps,
                   data_fingerprint=self.train_set.fingerprint, versions=versions(c))
        return cfg

    def _check_same_settings(self) -> None:
        """Every rank must train the same run: same flags, same data (by content), same model."""
        local = ("threads_per_rank", "versions", "blas", "data")      # may differ between nodes
        mine = {k: v for k, v in self.config.items() if k not in local}
        everyone = self.comm.allgather_obj(mine)
        differ = sorted({k for c in everyone for k in c.keys() | mine.keys() if c.get(k) != everyone[0].get(k)})
        if differ:
            ranks = [r for r, c in enumerate(everyone) if c != everyone[0]]
            raise SharedError(f"rank(s) {ranks} were started with other settings than rank 0 (differing: "
                              f"{', '.join(differ)}); start every rank with the same command and data")

    # -- resume / checkpoint ---------------------------------------------------

    def _resume(self) -> str | None:
        """Load the checkpoint --resume names (rank 0 reads it; everyone gets the state)."""
        choice = self.args.resume

        def find():
            path = state = None
            if choice == "auto":
                path, state = ckpt.newest_valid(self.run_dir) or (None, None)
            elif choice != "none":
                path, state = Path(choice), ckpt.load(Path(choice))
            if state is not None:
                ckpt.check_compatible(state, path, self.spec, self.train_set.fingerprint, self.config)
            if choice != "auto":
                ckpt.check_no_later(self.run_dir, state.step if state else 0, path)
            return (str(path), state) if state is not None else None

        state = on_root(self.comm, find)
        if state is None:
            return None
        path, s = state
        for vec, saved in ((self.model.params, s.params), (self.opt.velocity, s.velocity)):
            views = self.model.unflatten(vec)
            for name, v in views.items():
                v[...] = saved[name]
        self.step = s.step
        self.metrics, self.best_accuracy, self.elapsed0 = s.metrics, s.best_accuracy, s.elapsed
        for key in CARRIED:                               # the training totals since the last record
            self.iv[key] = s.interval.get(key, 0)
        if self.comm.is_root:
            epoch, done = divmod(s.step, self.steps_per_epoch)
            log.info("resuming from %s at step %d (epoch %d, %d of %d batches done; saved on %d rank(s))",
                     path, s.step, epoch + 1, done, self.steps_per_epoch, s.world_size)
        return path

    def state(self) -> ckpt.State:
        m = self.model
        epoch, next_batch = divmod(self.step, self.steps_per_epoch)
        return ckpt.State(
            params={k: v.copy() for k, v in m.p.items()},
            velocity={k: v.copy() for k, v in m.unflatten(self.opt.velocity).items()},
            epoch=epoch, next_batch=next_batch, step=self.step, spec=self.spec.to_dict(),
            config=self.config, data_fingerprint=self.train_set.fingerprint, metrics=self.metrics,
            best_accuracy=self.best_accuracy, elapsed=self.elapsed(), world_size=self.comm.size,
            interval={k: self.iv[k] for k in CARRIED})

    def save_checkpoint(self, best: bool = False) -> None:
        """Rank 0 writes ckpt-stepN.h5 (and best.h5), then prunes old ones; once per step."""
        if not self.comm.is_root or self.saved_step == self.step:
            return
        if not np.isfinite(self.model.params).all():     # diverging: the next loss check stops every rank
            log.warning("warning: not saving a checkpoint at step %d: the weights are not finite", self.step)
            return
        t0 = time.perf_counter()
        state = self.state()
        path = ckpt.save(ckpt.step_path(self.run_dir, self.step), state)
        if best:
            ckpt.save(self.run_dir / "best.h5", state)
        ckpt.prune(self.run_dir, self.args.keep)
        self.saved_step, self.last_ckpt_time = self.step, time.monotonic()
        log.debug("checkpoint %s written in %.3f s", path, time.perf_counter() - t0)

    # -- bookkeeping -------------------------------------------------------------

    def elapsed(self) -> float:
        return self.elapsed0 + time.perf_counter() - self.t_start

    def _reset_interval(self):
        # CARRIED: the training totals since the last record (kept in checkpoints);
        # trained: samples trained by this process since then (for images/s)
        self.iv = dict(loss=0.0, correct=0.0, samples=0, trained=0, data=0.0, compute=0.0, allreduce=0.0,
                       update=0.0, t0=time.perf_counter())

    def record(self, final: bool = False) -> dict:
        """Evaluate on the test set (all ranks) and, on rank 0, append one line to metrics.jsonl."""
        t0 = time.perf_counter()
        with np.errstate(over="ignore", invalid="ignore"):
            totals = evaluate_shared(self.model, self.xt, self.yt, self.comm)
        t_eval = time.perf_counter() - t0
        if not np.isfinite(totals.loss):
            self.diverged(self.step, f"the test loss after it is {totals.loss}")
        iv = self.iv
        train_time = t0 - iv["t0"]
        rec = {
            "epoch": round(self.step / self.steps_per_epoch, 4), "step": self.step,
            "train_loss": iv["loss"] / iv["samples"] if iv["samples"] else None,
            "train_accuracy": iv["correct"] / iv["samples"] if iv["samples"] else None,
            "test_loss": totals.loss, "test_accuracy": totals.accuracy,
            "test_per_class_accuracy": totals.summary()["per_class_accuracy"],     # None: no samples
            "images_per_second": round(iv["trained"] / train_time, 1) if iv["trained"] else None,
            "elapsed_seconds": round(self.elapsed(), 3), "world_size": self.comm.size,
            "global_batch_size": self.args.batch_size, "lr": self.schedule(max(self.step - 1, 0)),
            "time_data_s": round(iv["data"], 4), "time_compute_s": round(iv["compute"], 4),
            "time_allreduce_s": round(iv["allreduce"], 4), "time_update_s": round(iv["update"], 4),
            "time_eval_s": round(t_eval, 4), "final": final,
        }
        self.metrics.append(rec)
        if self.comm.is_root:
            write_text(self.run_dir / "metrics.jsonl", json.dumps(rec) + "\n", append=True)
            train = (f"train loss {rec['train_loss']:.4f} acc {100 * rec['train_accuracy']:.2f}%  "
                     if iv["samples"] else "")
            log.info("epoch %.2f step %d  %stest loss %.4f acc %.2f%%  %s img/s  %.1f s",
                     rec["epoch"], self.step, train, totals.loss, 100 * totals.accuracy,
                     f"{rec['images_per_second']:.0f}" if rec["images_per_second"] else "-", rec["elapsed_seconds"])
        self._reset_interval()
        return rec

    def record_and_checkpoint(self, final: bool) -> None:
        """Evaluate and record, then checkpoint (also as best.h5 when the test accuracy improved)."""
        acc = self.record(final=final)["test_accuracy"]
        best = acc > self.best_accuracy
        self.best_accuracy = max(self.best_accuracy, acc)
        self.save_checkpoint(best=best)

    def start(self) -> None:
        c = self.comm
        if c.is_root:
            # a resumed run keeps exactly the records its checkpoint knew of
            write_text(self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.metrics))
            write_text(self.run_dir / "config.json",
                       json.dumps({**self.config, "resumed_from": self.resumed_from}, indent=2) + "\n")
            sizes = [hi - lo for lo, hi in (shard_bounds(self.args.batch_size, r, c.size) for r in range(c.size))]
            per_rank = f"{min(sizes)}" if min(sizes) == max(sizes) else f"{min(sizes)}-{max(sizes)}"
            log.info("dpcnn %s: %d rank(s) on %d node(s), %d BLAS thread(s) per rank, BLAS %s%s",
                     __version__, c.size, c.num_nodes, self.threads, blas_summary(),
                     f", {self.config['versions'].get('mpi', '')}" if c.size > 1 else "")
            log.info("data %s (%d train, %d test); model %s params; global batch %d (%s per rank); "
                     "%d steps/epoch, %d epochs; run dir %s", self.data_path, self.train_set.n, self.test_set.n,
                     f"{self.spec.num_params:,}", self.args.batch_size, per_rank,
                     self.steps_per_epoch, self.args.epochs, self.run_dir)
            if self.threads * c.local_size > self.node_cpus:
                log.warning("warning: %d rank(s) x %d thread(s) on a node with %d usable CPUs: oversubscribed",
                            c.local_size, self.threads, self.node_cpus)
        c.barrier()

    # -- the loop ------------------------------------------------------------------

    def train_step(self, epoch: int, k: int) -> bool:
        """One synchronous step on global batch k of the epoch; True when some rank asked to stop."""
        t0 = time.perf_counter()
        x, y, M = self.loader.batch(epoch, k)
        t1 = time.perf_counter()
        with np.errstate(over="ignore", invalid="ignore"):            # divergence is caught below
            loss_sum, correct = self.model.loss_and_grad(x, y, denom=1)    # sums over this rank's slice
        t2 = time.perf_counter()
        n, buf = self.n, self.buf
        buf[n], buf[n + 1], buf[n + 2] = loss_sum, correct, 1.0 if self.stop.signum else 0.0
        self.comm.allreduce(buf)                                      # one collective per step
        t3 = time.perf_counter()
        if not np.isfinite(buf[n]):                                   # the same sum on every rank
            self.diverged(self.step + 1, f"the training loss is {buf[n]}")
        self.model.grads *= np.float32(1.0 / M)                       # the mean over the global batch
        self.opt.step(self.schedule(self.step))
        self.step += 1
        t4 = time.perf_counter()
        iv = self.iv
        iv["loss"] += float(buf[n])
        iv["correct"] += float(buf[n + 1])
        iv["samples"] += M
        iv["trained"] += M
        iv["data"] += t1 - t0
        iv["compute"] += t2 - t1
        iv["allreduce"] += t3 - t2
        iv["update"] += t4 - t3
        return buf[n + 2] > 0

    def diverged(self, step: int, what: str):
        """Stop every rank (they all see the same reduced value) before non-finite weights are saved."""
        raise SharedError(f"training diverged in step {step}: {what}; nothing of this step was saved "
                          f"(try a lower --lr than {self.args.lr:g}, or --warmup-epochs)")

    def check_in_sync(self) -> None:
        digests = self.comm.allgather_obj(params_digest(self.model.params))
        if len(set(digests)) > 1:
            bad = [r for r, d in enumerate(digests) if d != digests[0]]
            raise RuntimeError(f"parameters differ across ranks at step {self.step} (ranks {bad} differ "
                               "from rank 0): stopping")

    def run(self) -> int:
        a, c = self.args, self.comm
        if self.step >= self.end_step:                              # resumed: nothing to train
            if c.is_root:
                log.info("the run in %s is at step %d of %d: nothing to train (a larger --max-steps continues "
                         "it up to --epochs; another --out starts a new run)", self.run_dir, self.step,
                         self.end_step)
            return EXIT_OK
        self.start()
        bar = self._progress_bar()
        log_every = a.log_every or max(self.steps_per_epoch // 10, 1)
        spe = self.steps_per_epoch
        self.stop.install()
        self.iv["t0"] = time.perf_counter()                       # images/s counts training only
        try:
            stopped = False
            while self.step < self.end_step and not stopped:
                epoch, k = divmod(self.step, spe)
                stopped = self.train_step(epoch, k)
                s = self.step
                if bar is not None:
                    bar.update(1)
                    if s % 10 == 0:
                        bar.set_postfix_str(self._bar_text())
                elif c.is_root and s % log_every == 0:
                    log.info("epoch %d step %d/%d  %s", epoch + 1, k + 1, spe, self._bar_text())
                if a.check_every and s % a.check_every == 0:
                    self.check_in_sync()
                # Records and checkpoints come before acting on a stop, so a stop never skips one.
                if k + 1 == spe or s == self.end_step:                    # an epoch or the run ended
                    self.record_and_checkpoint(final=s == self.end_step)
                elif a.eval_every and s % a.eval_every == 0:
                    self.record()
                if c.is_root and self._checkpoint_due(s):               # (once per step: saved_step)
                    self.save_checkpoint()
            if bar is not None:
                bar.close()
            if stopped and self.step < self.end_step:
                if c.is_root:
                    log.warning("stop requested by signal: checkpoint at step %d, exiting with status %d "
                                "(resume with --resume auto)", self.step, EXIT_STOPPED)
                self.save_checkpoint()
                return EXIT_STOPPED
            self.check_in_sync()
            if c.is_root:
                last = self.metrics[-1]
                log.info("done: %d steps, test accuracy %.2f%%, %.1f s", self.step,
                         100 * last["test_accuracy"], self.elapsed())
            return EXIT_OK
        finally:
            self.stop.uninstall()

    def _checkpoint_due(self, s: int) -> bool:
        a = self.args
        if a.checkpoint_every and s % a.checkpoint_every == 0:
            return True
        return bool(a.checkpoint_minutes) and time.monotonic() - self.last_ckpt_time >= 60 * a.checkpoint_minutes

    def _bar_text(self) -> str:
        iv = self.iv
        if not iv["samples"]:
            return ""
        rate = iv["trained"] / max(time.perf_counter() - iv["t0"], 1e-9)
        return f"loss {iv['loss'] / iv['samples']:.4f} acc {100 * iv['correct'] / iv['samples']:.1f}% {rate:.0f} img/s"

    def _progress_bar(self):
        if not self.comm.is_root or self.args.no_progress or self.args.quiet or not sys.stderr.isatty():
            return None
        try:
            from tqdm import tqdm
        except ImportError:
            return None
        return tqdm(total=self.end_step, initial=self.step, unit="step", dynamic_ncols=True, leave=False)


@entry_point
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()                        # every step reuses, not re-faults, its temporaries
    try:
        comm = get_comm(args.comm)
    except CommError as e:
        report_error(e, args.debug)
        return EXIT_ERROR
    setup_logging(args.verbose, args.quiet, comm.rank)
    try:
        return Run(args, comm).run()
    except SharedError as e:                   # every rank knows: only rank 0 speaks, all exit together
        if comm.is_root:
            log.error("error: %s", e)
        return EXIT_ERROR
    except (Exception, KeyboardInterrupt) as e:
        report_error(e, args.debug, prefix=f"rank {comm.rank}: " if comm.size > 1 else "")
        if comm.size > 1:
            comm.abort(EXIT_ERROR)             # end every rank now, none left waiting in a collective
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
