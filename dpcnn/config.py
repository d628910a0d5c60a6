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
from collections.abc import Callable, Mapping
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
from .optim import LR_SCALINGS, OPTIMIZERS, SCHEDULES


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
    elastic: float = 0.0                     # augmentation: elastic distortions of this strength (alpha, pixels)
    elastic_sigma: float = 6.0               # ... smoothed by a Gaussian of this standard deviation (pixels);
                                             # 6 measured better than Simard's 4 with the default model
    # training
    epochs: int = 8
    batch_size: int = 64                     # GLOBAL batch, split across ranks
    micro_batch: int = 16                    # unit of computation: same bits on any number of ranks
    exact: bool = False                      # exact sums: the same bits on any rank count (costs 10-16%)
    overlap: bool = False                    # allreduce the dense gradient during the conv backward
    lr: float = 0.05
    lr_scaling: str = "none"                 # --lr is for batch 64; scaled to --batch-size: none, linear, sqrt
    large_batch: bool = False                # the large-batch recipe (train.large_batch_recipe)
    optimizer: str = "sgd"                   # sgd or lars (layer-wise trust ratio)
    trust: float = 0.12                      # LARS trust coefficient (measured: README, "Learning at scale")
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    seed: int = 0
    max_steps: int | None = None
    patience: int = 0                        # stop when this many records in a row bring no better accuracy
    # model
    channels: tuple[int, ...] = (8, 16)
    kernel: int = 3
    hidden: tuple[int, ...] = (128,)
    init: str = "torch"                      # how the initial weights are drawn (model.INITS); chosen by
                                             # measurement: He-normal left most conv2 channels dead on MNIST
    init_from: Path | None = None            # start from this checkpoint's weights instead (a new run)
    # run directory, evaluation, checkpoints
    out: Path | None = None                  # run directory; None: rundir.default_run_dir (runs/<dataset>-NNN)
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
        """self, once every field holds what the command line would accept for its flag (ACCEPTS);
        else ConfigError, one line naming the field. For Configs built in Python: parse_args has
        checked the command line's already."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ACCEPTS or isinstance(value, bool):
                if value is None and f.default is not None:
                    raise ConfigError(f"Config({f.name}=None): expected a value (the flag {_flag_name(f.name)})")
                if value is None or value == f.default:
                    continue
                try:
                    check_value(f.name, value)
                except (ValueError, TypeError) as e:
                    raise ConfigError(f"Config({f.name}={value!r}): {e} (the flag {_flag_name(f.name)})") from None
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
    preprocessing: dict             # what new images need to become inputs without the data file: the recipe,
                                    # per-channel mean and std, class names (h5format.Split.preprocessing)
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
    for training), or a tenth of a training split under 50,000 rows (Keras's validation_split
    habit), so that best.h5 is chosen by validation, never by the test set, unless asked (0)."""
    return VAL_SIZE if train_rows >= VAL_MIN_TRAIN_ROWS else train_rows // VAL_FRACTION


VAL_SIZE, VAL_MIN_TRAIN_ROWS, VAL_FRACTION = 5000, 50_000, 10
# What a run saved before a setting existed ran with, where that differs from today's default:
# no validation hold-out, He-normal weights, float sums. (Every other setting's default is what
# the code did before it could be set.)
ABSENT: dict[str, Any] = {"val_size": 0, "init": "he", "exact": False}
NOT_SAVED = ("progress",)
STORE_TRUE = ("keep_last", "tensorboard")             # flags without a --no- form


FLAG_OF = {"threads_per_rank": "threads"}              # facts of config.json set by a flag of another name


def _flag_name(key: str) -> str:
    return "--" + FLAG_OF.get(key, key).replace("_", "-")


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


degrees, zoom_range = float_in(0, 180, "degrees"), float_in(0, 0.5, "a zoom range")


def path_arg(s: str) -> Path:
    """A path flag's value: not empty (Path('') would be the current directory)."""
    if not s:
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return Path(s)


# What each setting accepts: the one check of a value, for its flag (argparse's type= and
# choices=) and for a Config built in Python (Config.check). Booleans accept True or False.
ACCEPTS: dict[str, tuple[Callable[[str], Any] | None, tuple | None]] = {
    "data": (path_arg, None), "dataset": (None, tuple(sorted(DATASETS))), "data_source": (None, None),
    "val_size": (nonneg_int, None), "val_seed": (nonneg_int, None), "shift": (nonneg_int, None),
    "rotate": (degrees, None), "scale": (zoom_range, None), "elastic": (nonneg_float, None),
    "elastic_sigma": (positive_float, None),
    "epochs": (positive_int, None), "batch_size": (positive_int, None), "micro_batch": (positive_int, None),
    "lr": (nonneg_float, None), "lr_scaling": (None, LR_SCALINGS), "optimizer": (None, OPTIMIZERS),
    "trust": (positive_float, None), "momentum": (unit_interval, None), "weight_decay": (nonneg_float, None),
    "schedule": (None, tuple(SCHEDULES)), "warmup_epochs": (nonneg_float, None), "milestones": (float_list, None),
    "gamma": (nonneg_float, None), "seed": (nonneg_int, None), "max_steps": (positive_int, None),
    "patience": (nonneg_int, None),
    "channels": (int_list, None), "kernel": (positive_int, None), "hidden": (int_list, None),
    "init": (None, tuple(INITS)), "init_from": (path_arg, None),
    "out": (path_arg, None), "eval_every": (nonneg_int, None), "checkpoint_every": (nonneg_int, None),
    "checkpoint_minutes": (nonneg_float, None), "keep": (positive_int, None), "resume": (None, None),
    "threads": (positive_int, None), "comm": (None, ("auto", "mpi", "serial")), "check_every": (nonneg_int, None),
    "timeout": (positive_float, None), "log_every": (nonneg_int, None),
}


def check_value(name: str, value: Any) -> None:
    """ValueError (what was expected) unless `value` is what the flag of field `name` accepts."""
    default = getattr(Config(), name)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError("expected True or False")
        return
    parse, choices = ACCEPTS[name]
    text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
    try:
        parsed = parse(text) if parse else value
    except argparse.ArgumentTypeError as e:
        raise ValueError(str(e)) from None
    if parsed != value or isinstance(value, str) != isinstance(parsed, str):
        raise ValueError(f"expected {type(parsed).__name__}, got {type(value).__name__}")
    if choices is not None and parsed not in choices:
        raise ValueError(f"expected one of {', '.join(map(str, choices))}")


def _flag(group, name: str, help: str, **kw) -> None:
    """Add the flag of Config field `name` (--name-with-dashes) to group: its default is Config's,
    its type and choices are ACCEPTS', booleans get a --no- form unless STORE_TRUE."""
    default = getattr(Config(), name)
    flag = "--" + name.replace("_", "-")
    if isinstance(default, bool):
        action = "store_true" if name in STORE_TRUE else argparse.BooleanOptionalAction
        group.add_argument(flag, action=action, default=default, help=help, **kw)
        return
    parse, choices = ACCEPTS[name]
    group.add_argument(flag, type=parse, choices=choices, default=default, help=help, **kw)


def build_parser(description: str = "") -> argparse.ArgumentParser:
    """The trainer's command line; every default is Config's, every check is ACCEPTS'."""
    p = Parser(prog="python -m dpcnn.train", description=description, epilog=EPILOG,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    _data_flags(p.add_argument_group("data"))
    _training_flags(p.add_argument_group("training"))
    _model_flags(p.add_argument_group("model"))
    _run_flags(p.add_argument_group("run directory, evaluation, checkpoints"))
    _parallel_flags(p.add_argument_group("parallelism"))
    add_common_flags(p)
    return p


def _data_flags(d) -> None:
    _flag(d, "data", f"prepared HDF5 file (default {default_data_path('<dataset>')}); it must exist, unless "
                     "--data-source is given (then rank 0 prepares it there)")
    _flag(d, "dataset", "data set (default mnist)")
    _flag(d, "data_source", "where to prepare a missing data file from: a directory with the IDX files or a base "
                            "URL (default: public mirrors)")
    _flag(d, "keep_last", "use the last partial global batch of each epoch (default: drop it)")
    _flag(d, "val_size", f"training samples held out for validation, which chooses best.h5 (default {VAL_SIZE}, or "
                         f"a tenth of a training split under {VAL_MIN_TRAIN_ROWS:,} samples); 0: none, best.h5 is "
                         "then chosen by test accuracy")
    _flag(d, "val_seed", "seed of the draw of the validation samples (default 0, whatever --seed is)")
    _flag(d, "shift", "augmentation: translate each training image by up to this many pixels on each axis "
                      "(default 0: off)")
    _flag(d, "rotate", "augmentation: rotate each training image by up to this many degrees (default 0: off; "
                       "slower: bilinear resampling)")
    _flag(d, "scale", "augmentation: magnify each training image by a factor drawn from [1 - SCALE, 1 + SCALE] "
                      "(default 0: off; e.g. 0.1; slower: bilinear resampling)")
    _flag(d, "elastic", "augmentation: elastic distortions (Simard et al. 2003): each pixel is displaced by a "
                        "random smooth field, uniform noise in [-1, 1] smoothed by a Gaussian of --elastic-sigma "
                        "and scaled by ELASTIC pixels (default 0: off; 34 suits MNIST)")
    _flag(d, "elastic_sigma", "with --elastic: the smoothing Gaussian's standard deviation in pixels; the larger, "
                              "the smoother and milder the distortion (default 6)")


def _training_flags(t) -> None:
    _flag(t, "epochs", "epochs (default 8)")
    _flag(t, "batch_size", "GLOBAL batch size, split across ranks (default 64)")
    _flag(t, "exact", "exact, order-independent sums over micro-batches (and, at global batches up to 110, "
                      "fc1's weight gradient from gathered factors): the same bits on any number of ranks and "
                      "across a resume on another rank count, at 4-18%% more time per step on one rank "
                      "(median 9%% at batch 64; default off: one float32 pass per rank; rank counts then agree "
                      "to float32 rounding)")
    _flag(t, "micro_batch", "with --exact: samples per forward/backward pass; each rank computes whole "
                            "micro-batches, so the result is bit-identical on any number of ranks up to "
                            "batch-size / micro-batch (default 16)")
    _flag(t, "lr", "peak learning rate (default 0.05); with --lr-scaling, the rate at a global batch of 64")
    _flag(t, "lr_scaling", "scale --lr from a global batch of 64 to --batch-size: none, linear (times B/64) or "
                           "sqrt (times sqrt(B/64)) (default none)")
    _flag(t, "large_batch", "the learning-rate recipe for any global batch, measured on MNIST from 16 to 4,096: "
                            "above 64, --lr-scaling sqrt --optimizer lars --warmup-epochs 2; at 64 or below, "
                            "--lr-scaling linear; each unless given otherwise (default off)")
    _flag(t, "optimizer", "sgd; lars: SGD with a layer-wise trust ratio (You et al. 2017) for large batches; "
                          "adamw: Adam with decoupled weight decay, PyTorch's AdamW rule (betas 0.9, 0.999, eps "
                          "1e-8; --weight-decay is its decay; give it a small --lr, e.g. 0.001) (default sgd)")
    _flag(t, "trust", "with --optimizer lars: the trust coefficient, a layer's step as a fraction of its "
                      "weights' norm per unit of learning rate (default 0.12)")
    _flag(t, "momentum", "SGD momentum, 0 <= m < 1 (default 0.9)")
    _flag(t, "nesterov", "Nesterov momentum (default on)")
    _flag(t, "weight_decay", "L2 weight decay (default 5e-4)")
    _flag(t, "schedule", "learning-rate schedule (default cosine)")
    _flag(t, "warmup_epochs", "linear warm-up epochs (default 0)")
    _flag(t, "milestones", "for --schedule step: when to multiply the rate by --gamma, as fractions of the run "
                           "if < 1 else epochs (default 0.5,0.75)")
    _flag(t, "gamma", "step schedule factor (default 0.1)")
    _flag(t, "seed", "seed of the initial weights and sample order (default 0)")
    _flag(t, "max_steps", "stop after this many updates (still evaluates, records and checkpoints)")
    _flag(t, "patience", "stop early when this many evaluations in a row bring no better validation accuracy "
                         "(the test accuracy without a validation split); best.h5 holds the best (default 0: never)")


def _model_flags(m) -> None:
    _flag(m, "channels", "filters per conv block (default 8,16)")
    _flag(m, "kernel", "conv kernel size (default 3)")
    _flag(m, "hidden", "dense hidden widths (default 128)")
    _flag(m, "init", f"initial weights: he (He-normal, zero biases), torch (PyTorch's default: uniform within "
                     f"1/sqrt(fan_in), biases too), glorot (Glorot-uniform, zero biases) (default {Config.init})")
    _flag(m, "init_from", "start a new run from this checkpoint's weights (not its momentum or position); the "
                          "model flags must match it")


def _run_flags(r) -> None:
    _flag(r, "out", "run directory (default: a new runs/<dataset>-NNN, or the newest run if it stopped before its "
                    "end and had these settings, which this command then continues; runs/latest points at it)")
    _flag(r, "eval_every", "also evaluate every N steps (default 0: at each epoch's end only)")
    _flag(r, "checkpoint_every", "also checkpoint every N steps (default 0: at epoch ends only)")
    _flag(r, "checkpoint_minutes", "also checkpoint when this many minutes passed since the last one (default 0: "
                                   "off)")
    _flag(r, "keep", "step checkpoints to keep (default 3; best.h5 is kept besides)")
    _flag(r, "resume", "'auto' (newest valid checkpoint in --out, if any), 'none', or a checkpoint path "
                       "(default auto)")


def _parallel_flags(s) -> None:
    _flag(s, "threads", "BLAS threads per rank (default 1, or $SLURM_CPUS_PER_TASK); threads change float32 "
                        "rounding, so keep one value to get the same bits on any number of ranks")
    _flag(s, "comm", "communicator (default auto: MPI when started by an MPI launcher)")
    _flag(s, "overlap", "reduce the dense layers' gradient while the convolution backward runs (MPI "
                        "Iallreduce); the same bits as without (float sums: overlapped on 2 ranks only)")
    _flag(s, "check_every", "verify every N steps that all ranks hold identical parameters (default 500)")
    _flag(s, "timeout", "end the job (status 69) when a step or collective makes no progress for this many "
                        "seconds: a stopped, dead or cut-off rank or node (default 600)")
    _flag(s, "log_every", "log a line every N steps (default: ~10 an epoch)")
    s.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar even on a terminal")
    _flag(s, "tensorboard", "also write TensorBoard event files to <out>/tensorboard (needs: pip install "
                            "'dpcnn[tensorboard]'); then: tensorboard --logdir runs")


def parse_args(argv=None, description: str = "") -> tuple[Config, argparse.Namespace]:
    """(the Config, the console flags -v/-q/--debug) from a command line; exits 2 on a bad one."""
    ns = build_parser(description).parse_args(argv)
    return Config(**{f.name: getattr(ns, f.name) for f in fields(Config)}), ns
