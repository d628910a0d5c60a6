"""A training run's configuration: one typed, frozen object, built once from the command line.

``Config`` is the single source of truth for what a run does. The trainer receives it;
``config.json`` and every checkpoint store ``Config.to_dict()``; a resume must share the settings
that ``checkpoint.resume_conflicts`` names (by their flags, ``flag_text``); every rank must
have been given an equal one. Nothing else parses flags.

    cfg = Config(epochs=2, out=Path("runs/quick"))       # from Python
    cfg, out = parse_args(["--epochs", "2"])            # from a command line
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .cli import (
    Parser,
    UserError,
    add_common_flags,
    float_in,
    float_list,
    int_list,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
    unit_interval,
)
from .data import default_data_path
from .datasets import DATASETS
from .model import INITS
from .optim import SCHEDULES


@dataclass(frozen=True)
class Config:
    """Every setting of a training run, with the command line's defaults."""

    # data
    data: Path | None = None                 # prepared HDF5 file; None: data/<dataset>.h5
    dataset: str = "mnist"
    data_source: str | None = None           # where to prepare a missing file from: directory or URL
    keep_last: bool = False                  # keep the last partial global batch of an epoch
    val_size: int | None = None              # training rows held out for validation; None: default_val_size
    val_seed: int = 0                        # which rows are held out (not --seed: the same rows for every seed)
    shift: int = 0                           # augmentation: random translations of up to this many pixels
    rotate: float = 0.0                      # augmentation: random rotations of up to this many degrees
    scale: float = 0.0                       # augmentation: random zooms by a factor in [1 - scale, 1 + scale]
    # training
    epochs: int = 8
    batch_size: int = 64                     # GLOBAL batch, split across ranks
    micro_batch: int = 16                    # unit of computation: same bits on any number of ranks
    exact: bool = False                      # exact sums: the same bits on any rank count (costs 20-40%)
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    seed: int = 0
    max_steps: int | None = None
    # model
    channels: tuple[int, ...] = (8, 16)
    kernel: int = 3
    hidden: tuple[int, ...] = (128,)
    init: str = "torch"                      # how the initial weights are drawn (model.INITS); chosen by
                                             # measurement: He-normal left most conv2 channels dead on MNIST
    init_from: Path | None = None            # start from this checkpoint's weights instead (a new run)
    # run directory, evaluation, checkpoints
    out: Path = Path("runs/latest")
    eval_every: int = 0
    checkpoint_every: int = 0
    checkpoint_minutes: float = 0.0
    keep: int = 3
    resume: str = "auto"                     # 'auto', 'none' or a checkpoint path
    # parallelism and console
    threads: int | None = None               # BLAS threads per rank; None: $SLURM_CPUS_PER_TASK or 1
    comm: str = "auto"
    check_every: int = 500
    timeout: float = 600.0                   # seconds without progress before the watchdog ends the job
    log_every: int = 0
    progress: bool = True                    # a progress bar on a terminal (rank 0)
    tensorboard: bool = False                # also write TensorBoard event files (rank 0)

    def __post_init__(self):
        for name in ("milestones", "channels", "hidden"):          # JSON and callers give lists
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("data", "out", "init_from"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (str, os.PathLike)) or str(v) == ""):
                raise ConfigError(f"Config({name}={v!r}): expected a path (a non-empty str or os.PathLike)")
            object.__setattr__(self, name, None if v is None else Path(v))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: paths as strings, tuples as lists; console-only settings left out."""
        out = {}
        for f in fields(self):
            if f.name in NOT_SAVED:
                continue
            v = getattr(self, f.name)
            out[f.name] = str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Config:
        """The Config of a saved config.json or checkpoint: its settings (facts and unknown keys are
        ignored); a setting it lacks (saved before the setting existed) is what that run ran with
        (ABSENT), else today's default."""
        names = {f.name for f in fields(cls)}
        return cls(**{**ABSENT, **{k: v for k, v in d.items() if k in names}})

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)

    def check(self) -> Config:
        """self, once every field holds what the command line would accept for its flag (the
        flag's own argparse type and choices); else ConfigError, one line naming the field. For
        Configs built in Python: parse_args has checked the command line's already."""
        D = Config()
        for action in build_parser()._actions:
            name = action.dest
            if not hasattr(D, name) or getattr(self, name) == getattr(D, name):
                continue
            value = getattr(self, name)
            if value is None:                            # where the default is not None
                raise ConfigError(f"Config({name}=None): expected a value (the flag {action.option_strings[0]})")
            text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            try:
                if isinstance(getattr(D, name), bool) and not isinstance(value, bool):
                    raise ValueError("expected True or False")
                parsed = action.type(text) if callable(action.type) else value
                if parsed != value or isinstance(value, str) and not isinstance(parsed, str):
                    raise ValueError(f"expected {type(parsed).__name__}, got {type(value).__name__}")
                if action.choices is not None and parsed not in action.choices:
                    raise ValueError(f"expected one of {', '.join(map(str, action.choices))}")
            except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
                raise ConfigError(f"Config({name}={value!r}): {e} (the flag {action.option_strings[0]})") from None
        return self

    def with_val_size(self, train_rows: int) -> Config:
        """This config with val_size settled for a training split of train_rows rows."""
        return self if self.val_size is not None else self.replace(val_size=default_val_size(train_rows))


@dataclass(frozen=True)
class Facts:
    """What a run is made of, beside its Config: the data, the model, the ranks and the software.
    config.json holds both (``config_json``); every rank must agree on all but LOCAL."""

    data: str                       # the data file's absolute path
    dataset: str
    data_fingerprint: str           # SHA-256 of its arrays' SHA-256s
    train_samples: int              # training rows (without the validation hold-out)
    drop_last: bool
    steps_per_epoch: int
    total_steps: int
    model: dict                     # ModelSpec.to_dict()
    num_params: int
    world_size: int
    nodes: int
    hosts: list
    threads_per_rank: int
    blas: str
    versions: dict

    LOCAL = ("threads_per_rank", "versions", "blas", "data")    # may differ between nodes

    def shared(self, cfg: Config) -> dict[str, Any]:
        """The settings and facts every rank of a run must agree on."""
        return {k: v for k, v in {**cfg.to_dict(), **dataclasses.asdict(self)}.items() if k not in self.LOCAL}


def config_json(cfg: Config, facts: Facts, resumed_from: str | None) -> dict[str, Any]:
    """config.json: the Config, the Facts and the checkpoint the run continued from."""
    return {**cfg.to_dict(), **dataclasses.asdict(facts), "resumed_from": resumed_from}


class ConfigError(UserError):
    """A Config field the command line would refuse (one line naming the field)."""


def default_val_size(train_rows: int) -> int:
    """--val-size when none is given: 5000 rows (MNIST's and Fashion-MNIST's 60,000 keep 55,000
    for training), or none for a training split under 50,000 rows."""
    return VAL_SIZE if train_rows >= VAL_MIN_TRAIN_ROWS else 0


VAL_SIZE, VAL_MIN_TRAIN_ROWS = 5000, 50_000
# What a run saved before a setting existed ran with, where that differs from today's default:
# no validation hold-out, He-normal weights, float sums. (Every other setting's default is what
# the code did before it could be set.)
ABSENT: dict[str, Any] = {"val_size": 0, "init": "he", "exact": False}
NOT_SAVED = ("progress",)
STORE_TRUE = ("keep_last",)                            # flags without a --no- form


FLAG_OF = {"threads_per_rank": "threads"}              # facts of config.json set by a flag of another name


def flag_text(key: str, value: Any) -> str:
    """A setting as the flag that sets it: '--lr 0.05', '--no-nesterov', 'no --keep-last'."""
    key = FLAG_OF.get(key, key)
    flag = "--" + key.replace("_", "-")
    if value is None:
        return f"no {flag}"
    if isinstance(value, bool):
        if key in STORE_TRUE:
            return flag if value else f"no {flag}"
        return flag if value else f"--no-{key.replace('_', '-')}"
    if isinstance(value, (list, tuple)):
        value = ",".join(map(str, value))
    return f"{flag} {value}"


# ----------------------------------------------------------------------------- command line

EPILOG = """\
examples:
  python -m dpcnn.train                                  MNIST, defaults, one process
  python -m dpcnn.train --data-source ~/datasets/mnist      prepare from local IDX files if needed
  mpirun -n 4 python -m dpcnn.train --epochs 8 --out runs/four
  python -m dpcnn.train --max-steps 200 --eval-every 100 --out runs/quick
  srun --mpi=pmi2 python -m dpcnn.train --out runs/$SLURM_JOB_ID --resume auto
  python -m dpcnn.train --dataset fashion-mnist --epochs 15
  python -m dpcnn.train --shift 2 --rotate 10 --epochs 32   augmentation: shifts of up to 2 pixels,
                                                            rotations of up to 10 degrees (99.46% on MNIST)
  python -m dpcnn.train --init-from runs/latest/best.h5 --epochs 2 --lr 0.005 --out runs/tune

exit status: 0 done, 75 stopped by SIGTERM/SIGUSR1/Ctrl-C (run the same command again to
continue from the newest checkpoint), 69 a rank or node stopped responding (--timeout),
1 error, 2 bad command line.
"""


def build_parser(description: str = "") -> argparse.ArgumentParser:
    """The trainer's command line; every default is Config's."""
    D = Config()
    p = Parser(prog="python -m dpcnn.train", description=description, epilog=EPILOG,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", type=path_arg, help=f"prepared HDF5 file (default {default_data_path('<dataset>')}); "
                                             "it must exist, unless --data-source is given (then rank 0 "
                                             "prepares it there)")
    d.add_argument("--dataset", default=D.dataset, choices=sorted(DATASETS), help="data set (default mnist)")
    d.add_argument("--data-source", help="where to prepare a missing data file from: a directory with "
                                         "the IDX files or a base URL (default: public mirrors)")
    d.add_argument("--keep-last", action="store_true",
                   help="use the last partial global batch of each epoch (default: drop it)")
    d.add_argument("--val-size", type=nonneg_int,
                   help=f"training samples held out for validation, which chooses best.h5 (default "
                        f"{VAL_SIZE}; 0 for a training split under {VAL_MIN_TRAIN_ROWS:,} samples); 0: none, "
                        "best.h5 is then chosen by test accuracy")
    d.add_argument("--val-seed", type=nonneg_int, default=D.val_seed,
                   help="seed of the draw of the validation samples (default 0, whatever --seed is)")
    d.add_argument("--shift", type=nonneg_int, default=D.shift,
                   help="augmentation: translate each training image by up to this many pixels on each axis "
                        "(default 0: off)")
    d.add_argument("--rotate", type=degrees, default=D.rotate,
                   help="augmentation: rotate each training image by up to this many degrees (default 0: off; "
                        "slower: bilinear resampling)")
    d.add_argument("--scale", type=zoom_range, default=D.scale,
                   help="augmentation: magnify each training image by a factor drawn from [1 - SCALE, 1 + SCALE] "
                        "(default 0: off; e.g. 0.1; slower: bilinear resampling)")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=positive_int, default=D.epochs, help="epochs (default 8)")
    t.add_argument("--batch-size", type=positive_int, default=D.batch_size,
                   help="GLOBAL batch size, split across ranks (default 64)")
    t.add_argument("--exact", action=argparse.BooleanOptionalAction, default=D.exact,
                   help="exact, order-independent sums over micro-batches: the same bits on any number of ranks "
                        "and across a resume on another rank count, at 20-40%% more time per step on one rank "
                        "(default off: one float32 pass per rank; rank counts then agree to float32 rounding)")
    t.add_argument("--micro-batch", type=positive_int, default=D.micro_batch,
                   help="with --exact: samples per forward/backward pass; each rank computes whole "
                        "micro-batches, so the result is bit-identical on any number of ranks up to batch-size / "
                        "micro-batch (default 16)")
    t.add_argument("--lr", type=nonneg_float, default=D.lr, help="peak learning rate (default 0.05)")
    t.add_argument("--momentum", type=unit_interval, default=D.momentum,
                   help="SGD momentum, 0 <= m < 1 (default 0.9)")
    t.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=D.nesterov,
                   help="Nesterov momentum (default on)")
    t.add_argument("--weight-decay", type=nonneg_float, default=D.weight_decay,
                   help="L2 weight decay (default 5e-4)")
    t.add_argument("--schedule", choices=SCHEDULES, default=D.schedule, help="learning-rate schedule (default cosine)")
    t.add_argument("--warmup-epochs", type=nonneg_float, default=D.warmup_epochs,
                   help="linear warm-up epochs (default 0)")
    t.add_argument("--milestones", type=float_list, default=D.milestones,
                   help="for --schedule step: when to multiply the rate by --gamma, as fractions of "
                        "the run if < 1 else epochs (default 0.5,0.75)")
    t.add_argument("--gamma", type=nonneg_float, default=D.gamma, help="step schedule factor (default 0.1)")
    t.add_argument("--seed", type=nonneg_int, default=D.seed,
                   help="seed of the initial weights and sample order (default 0)")
    t.add_argument("--max-steps", type=positive_int, help="stop after this many updates (still evaluates, "
                                                          "records and checkpoints)")
    m = p.add_argument_group("model")
    m.add_argument("--channels", type=int_list, default=D.channels, help="filters per conv block (default 8,16)")
    m.add_argument("--kernel", type=positive_int, default=D.kernel, help="conv kernel size (default 3)")
    m.add_argument("--hidden", type=int_list, default=D.hidden, help="dense hidden widths (default 128)")
    m.add_argument("--init", choices=INITS, default=D.init,
                   help=f"initial weights: he (He-normal, zero biases), torch (PyTorch's default: uniform "
                        f"within 1/sqrt(fan_in), biases too), glorot (Glorot-uniform, zero biases) "
                        f"(default {D.init})")
    m.add_argument("--init-from", type=path_arg,
                   help="start a new run from this checkpoint's weights (not its momentum or position); the "
                        "model flags must match it")
    r = p.add_argument_group("run directory, evaluation, checkpoints")
    r.add_argument("--out", type=path_arg, default=D.out, help="run directory (default runs/latest)")
    r.add_argument("--eval-every", type=nonneg_int, default=D.eval_every,
                   help="also evaluate every N steps (default 0: at each epoch's end only)")
    r.add_argument("--checkpoint-every", type=nonneg_int, default=D.checkpoint_every,
                   help="also checkpoint every N steps (default 0: at epoch ends only)")
    r.add_argument("--checkpoint-minutes", type=nonneg_float, default=D.checkpoint_minutes,
                   help="also checkpoint when this many minutes passed since the last one (default 0: off)")
    r.add_argument("--keep", type=positive_int, default=D.keep,
                   help="step checkpoints to keep (default 3; best.h5 is kept besides)")
    r.add_argument("--resume", default=D.resume,
                   help="'auto' (newest valid checkpoint in --out, if any), 'none', or a checkpoint path "
                        "(default auto)")
    s = p.add_argument_group("parallelism")
    s.add_argument("--threads", type=positive_int,
                   help="BLAS threads per rank (default 1, or $SLURM_CPUS_PER_TASK); threads change float32 "
                        "rounding, so keep one value to get the same bits on any number of ranks")
    s.add_argument("--comm", choices=("auto", "mpi", "serial"), default=D.comm,
                   help="communicator (default auto: MPI when started by an MPI launcher)")
    s.add_argument("--check-every", type=nonneg_int, default=D.check_every,
                   help="verify every N steps that all ranks hold identical parameters (default 500)")
    s.add_argument("--timeout", type=positive_float, default=D.timeout,
                   help="end the job (status 69) when a step or collective makes no progress for this many "
                        "seconds: a stopped, dead or cut-off rank or node (default 600)")
    s.add_argument("--log-every", type=nonneg_int, default=D.log_every,
                   help="log a line every N steps (default: ~10 an epoch)")
    s.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar even on a terminal")
    s.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard event files to <out>/tensorboard (needs: pip install "
                        "'dpcnn[tensorboard]'); then: tensorboard --logdir runs")
    add_common_flags(p)
    return p


degrees, zoom_range = float_in(0, 180, "degrees"), float_in(0, 0.5, "a zoom range")


def path_arg(s: str) -> Path:
    """A path flag's value: not empty (Path('') would be the current directory)."""
    if not s:
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return Path(s)


def parse_args(argv=None, description: str = "") -> tuple[Config, argparse.Namespace]:
    """(the Config, the console flags -v/-q/--debug) from a command line; exits 2 on a bad one."""
    ns = build_parser(description).parse_args(argv)
    return Config(**{f.name: getattr(ns, f.name) for f in fields(Config)}), ns
