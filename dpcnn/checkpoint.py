"""Checkpoints: HDF5 files that let a run continue exactly where it stopped.

A checkpoint holds the parameters by layer name, the optimizer's velocity by layer
name, the position in the sample order (epoch and next global batch), the global
step, the model spec, the full configuration, the data set's fingerprint, the
metrics so far and the dpcnn version. The sample order depends only on the seed
and the epoch, so these are the whole state: a resume on any number of ranks
follows the same order.

Files are written to a temporary name, flushed and fsynced, then renamed, so a
crash during a write never damages an earlier checkpoint. Every load checks what was
written: the attribute ``sha256`` is the SHA-256 of every other attribute (step, position,
config, metrics, fingerprint, ...) and of the weights and momentum (``file_digest``; each array
also has a Fletcher-32 checksum), and the arrays must be finite, so a flipped bit anywhere that
a resume, evaluate or predict reads, or a NaN, is refused, naming the file. Format 1 files
(before the digest covered the attributes) load with their arrays' digest only.

The rules for continuing a run from a checkpoint (``resume_conflicts``) live here too: what a
resume must share with the run that wrote it.

This module also holds what evaluate and predict share: ``load_model`` and the data checks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from . import __version__
from .cli import UserError
from .config import Config, flag_text
from .data import Split
from .fileio import write_h5_atomic
from .model import CNN, ModelSpec

log = logging.getLogger(__name__)

FORMAT = "dpcnn-checkpoint"
VERSION = 2                    # 2: the digest covers the attributes; 1: the arrays only (still read)
DIGEST = "sha256"
# How the samples after the initial weights are drawn from the configuration and the position
# (dpcnn.data: the order over the training rows, the validation hold-out, the augmentation stream).
# Raise it when that changes: a checkpoint of another sampling cannot be continued the same way.
SAMPLE_ORDER = 1


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not fit this run (one-line message)."""


@dataclass
class State:
    """Everything a checkpoint stores."""

    params: dict[str, np.ndarray]          # layer name -> array
    velocity: dict[str, np.ndarray]        # layer name -> array (optimizer momentum)
    epoch: int                             # epoch of the next global batch
    next_batch: int                        # index of the next global batch in that epoch
    step: int                              # updates done so far
    spec: dict
    config: dict
    data_fingerprint: str
    metrics: list = field(default_factory=list)
    best_accuracy: float = -1.0
    elapsed: float = 0.0                   # training wall time so far, seconds, over all attempts
    version: str = __version__
    world_size: int = 1
    interval: dict = field(default_factory=dict)   # training loss/correct/samples summed since the last record
    second: dict[str, np.ndarray] | None = None    # layer name -> array: AdamW's second moment (else None)

    def groups(self) -> list[tuple[str, dict[str, np.ndarray]]]:
        """The arrays by HDF5 group: params, velocity, and second (AdamW) when there is one."""
        return [("params", self.params), ("velocity", self.velocity)] + \
            ([("second", self.second)] if self.second is not None else [])

    @property
    def settings(self) -> Config:
        """The Config the run had (from the saved config.json facts)."""
        return Config.from_dict(self.config)

    @property
    def dataset(self) -> str:
        """The name of the data set the run trained on ('?' if the checkpoint does not say)."""
        return str(self.config.get("dataset", "?"))

    @property
    def data_file(self) -> str | None:
        """The data file the run trained on (its absolute path), if the checkpoint records it."""
        return self.config.get("data") or None


def save(path: Path, s: State) -> Path:
    """Write State s to path atomically (built in memory, one write, fsync, rename)."""

    def fill(f: h5py.File) -> None:
        a = f.attrs
        a["format"], a["format_version"], a["dpcnn_version"] = FORMAT, VERSION, s.version
        a["epoch"], a["next_batch"], a["step"] = s.epoch, s.next_batch, s.step
        a["spec"], a["config"] = json.dumps(s.spec), json.dumps(s.config)
        a["data_fingerprint"], a["metrics"] = s.data_fingerprint, json.dumps(s.metrics)
        a["best_accuracy"], a["world_size"], a["elapsed"] = s.best_accuracy, s.world_size, s.elapsed
        a["written_at"], a["interval"] = time.time(), json.dumps(s.interval)
        a["sample_order_version"] = SAMPLE_ORDER
        for group, arrays in s.groups():
            g = f.create_group(group)
            for name, v in arrays.items():       # Fletcher-32 on each chunk: damage is found on read
                g.create_dataset(name, data=v, chunks=v.shape or None, fletcher32=v.size > 0)
        a[DIGEST] = file_digest(a, s.groups())          # of the attributes as stored, read back

    return write_h5_atomic(path, fill)


Groups = list[tuple[str, dict[str, np.ndarray]]]      # the arrays by HDF5 group (State.groups)


def arrays_digest_of(params: dict[str, np.ndarray], velocity: dict[str, np.ndarray]) -> str:
    """SHA-256 over the parameters and the velocity, by group and name (format 1's digest)."""
    h = hashlib.sha256()
    _hash_arrays(h, [("params", params), ("velocity", velocity)])
    return h.hexdigest()


def _hash_arrays(h, groups: Groups) -> None:
    for group, arrays in groups:
        for name in sorted(arrays):
            v = np.ascontiguousarray(arrays[name])
            h.update(f"{group}/{name}:{v.dtype.str}:{v.shape}".encode())
            h.update(v.tobytes())


def file_digest(attrs: h5py.AttributeManager, groups: Groups) -> str:
    """SHA-256 of every attribute but the digest itself (by name, type and stored bytes) and of
    the arrays: what format 2 stores as ``sha256`` and checks on every load."""
    h = hashlib.sha256()
    for name in sorted(attrs):
        if name == DIGEST:
            continue
        v = attrs[name]
        if isinstance(v, (str, bytes)):
            kind, data = "str", v.encode() if isinstance(v, str) else v
        else:
            arr = np.asarray(v)
            kind, data = arr.dtype.str, arr.tobytes()
        h.update(f"{name}\0{kind}\0{len(data)}\0".encode())
        h.update(data)
    _hash_arrays(h, groups)
    return h.hexdigest()


def load(path: Path) -> State:
    """Read a checkpoint; CheckpointError (naming the file) when it is not a valid one."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected a checkpoint file (e.g. {path}/best.h5)")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with h5py.File(path, "r", locking=False) as f:
            a = f.attrs
            if a.get("format") != FORMAT:
                raise CheckpointError(f"{path}: not a dpcnn checkpoint")
            version = int(a["format_version"])
            if version == 1 and (DIGEST in a or "sample_order_version" in a):
                version = VERSION                    # format 2's attributes: checked as format 2 (a downgrade)
            if version not in (1, VERSION):
                raise CheckpointError(f"{path}: checkpoint format {version}, this dpcnn reads 1 and {VERSION}")
            params = {k: v[...] for k, v in f["params"].items()}
            velocity = {k: v[...] for k, v in f["velocity"].items()}
            second = {k: v[...] for k, v in f["second"].items()} if "second" in f else None
            groups = [("params", params), ("velocity", velocity)] + ([("second", second)] if second is not None else [])
            stored = a.get(DIGEST if version > 1 else "arrays_sha256")
            if version > 1:
                if stored is None or str(stored) != file_digest(a, groups):
                    raise CheckpointError(f"{path}: damaged: what it holds differs from what was written "
                                          "(SHA-256 mismatch)")
            elif stored is None:
                raise CheckpointError(f"{path}: a format-1 checkpoint without the digest of its arrays "
                                      "(arrays_sha256): it cannot be verified")
            elif str(stored) != arrays_digest_of(params, velocity):
                raise CheckpointError(f"{path}: damaged: its weights or momentum differ from what was written "
                                      "(SHA-256 mismatch)")
            order = int(a.get("sample_order_version", 1))
            s = State(params=params, velocity=velocity, epoch=int(a["epoch"]),
                      next_batch=int(a["next_batch"]), step=int(a["step"]),
                      spec=json.loads(a["spec"]), config=json.loads(a["config"]),
                      data_fingerprint=str(a["data_fingerprint"]), metrics=json.loads(a["metrics"]),
                      best_accuracy=float(a["best_accuracy"]), elapsed=float(a["elapsed"]),
                      version=str(a["dpcnn_version"]),
                      world_size=int(a["world_size"]), interval=json.loads(a.get("interval", "{}")),
                      second=second)
        if order != SAMPLE_ORDER:
            raise CheckpointError(f"{path}: its samples were drawn by sampling scheme {order}, this dpcnn draws "
                                  f"them by {SAMPLE_ORDER}; continue it with the dpcnn that wrote it "
                                  f"({s.version})")
        _check_contents(s)
        bad = [f"{g}/{k}" for g, arrays in s.groups() for k, v in arrays.items() if not np.isfinite(v).all()]
        if bad:
            raise CheckpointError(f"{path}: holds non-finite values (in {', '.join(bad[:3])}); it is not a "
                                  "usable state")
        return s
    except CheckpointError:
        raise
    # RuntimeError: what h5py raises for some damage inside an otherwise readable file
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable or incomplete checkpoint ({type(e).__name__}: {e})") from None


def _check_contents(s: State) -> None:
    """ValueError unless the arrays are exactly the spec's parameters and the records are lists."""
    shapes = dict(ModelSpec.from_dict(s.spec).param_shapes())
    for group, arrays in s.groups():
        got = {k: tuple(v.shape) for k, v in arrays.items()}
        if got != shapes:
            raise ValueError(f"{group} {got} do not match the saved model spec's {shapes}")
    if s.step < 0 or not isinstance(s.metrics, list) or not all(isinstance(m, dict) for m in s.metrics) \
            or not isinstance(s.interval, dict) or not isinstance(s.config, dict):
        raise ValueError("malformed step, metrics, interval or config attribute")


# What a resumed run must share with its checkpoint: the samples and their order (seed, batch
# size, keep_last, the validation hold-out, the augmentation), the optimizer and learning-rate
# schedule (epochs sets the schedule's length), how the run started (init, init_from), so that
# config.json keeps describing it, and whether its sums are exact. With exact sums, also what
# sets the bits of every micro-batch: its size and the BLAS threads per rank.
RESUME_FIELDS = ("seed", "batch_size", "keep_last", "val_size", "val_seed", "shift", "rotate", "scale", "elastic",
                 "elastic_sigma", "epochs", "lr", "lr_scaling", "large_batch", "optimizer", "trust", "schedule",
                 "warmup_epochs", "momentum", "nesterov", "weight_decay", "init", "init_from", "exact")
RESUME_FIELDS_STEP = ("milestones", "gamma")          # only for --schedule step
RESUME_FIELDS_EXACT = ("micro_batch", "threads_per_rank")


def resume_conflicts(config: Config, threads: int, saved: dict) -> list[str]:
    """The settings in which this run (config, BLAS threads per rank) differs from the saved
    config.json of the run it would continue, as '--flag NOW (saved: --flag THEN)'."""
    mine = {**config.to_dict(), "threads_per_rank": threads}
    then = {**Config.from_dict(saved).to_dict(), "threads_per_rank": saved.get("threads_per_rank")}
    keys = RESUME_FIELDS + (RESUME_FIELDS_STEP if config.schedule == "step" else ()) \
        + (RESUME_FIELDS_EXACT if config.exact or then["exact"] else ())
    return [f"{flag_text(k, mine[k])} (saved: {flag_text(k, then[k])})" for k in keys
            if then[k] != mine[k] and not (k == "threads_per_rank" and then[k] is None)]


def check_compatible(s: State, path: Path, spec: ModelSpec, data: Split, train_samples: int, config: Config,
                     threads: int) -> None:
    """Refuse a checkpoint that belongs to another model, data set, sample order or schedule.

    The data set is the same when its arrays are (the fingerprint of their SHA-256s). Format 1
    checkpoints identified it by name and source only: those are accepted when the number of
    training samples is the same too, with a warning."""
    if ModelSpec.from_dict(s.spec) != spec:
        raise CheckpointError(f"{path}: saved for model {ModelSpec.from_dict(s.spec)}, "
                              f"this run builds {spec}")
    legacy = s.data_fingerprint == data.legacy_fingerprint and s.config.get("train_samples") == train_samples
    if s.data_fingerprint != data.fingerprint and not legacy:
        raise CheckpointError(f"{path}: saved for another data set "
                              f"({s.dataset}, fingerprint {s.data_fingerprint[:12]}), "
                              f"this run reads {data.path} (fingerprint {data.fingerprint[:12]})")
    if legacy:
        log.warning("warning: %s: written by dpcnn %s, which identified the data by its name only: make sure "
                    "%s holds the data that run trained on", path, s.version, data.path)
    conflicts = resume_conflicts(config, threads, s.config)
    if conflicts:
        raise CheckpointError(f"{path}: this run differs from the run it would continue in {len(conflicts)} "
                              f"setting{'s'[:len(conflicts) > 1]}: {', '.join(conflicts)}; give the saved "
                              "settings to continue it, or another --out for a new run")


# ----------------------------------------------------------------------------- for evaluate and predict


def load_model(path: Path) -> tuple[CNN, State]:
    """A checkpoint -> (the CNN with its saved parameters, the State). CheckpointError if unreadable
    or if its arrays do not fit its spec (``load`` checks both)."""
    state = load(path)
    model = CNN(ModelSpec.from_dict(state.spec))
    for name, v in model.p.items():
        v[...] = state.params[name]
    return model, state


def load_init(path: Path, spec: ModelSpec, fingerprint: str) -> tuple[dict[str, np.ndarray], str]:
    """--init-from: (the parameters of the checkpoint at path, what it is, for the log). A model
    that differs from spec is refused."""
    s = load(path)
    saved = ModelSpec.from_dict(s.spec)
    if saved != spec:
        raise CheckpointError(f"--init-from {path}: saved for model {saved}, this run builds {spec}; "
                              "give the model flags it was trained with")
    other = "" if s.data_fingerprint == fingerprint else f", trained on {s.dataset}"
    return s.params, f"step {s.step}{other}"


def recorded_data_path(state: State, path: Path) -> Path:
    """The data file the checkpoint was trained on, from its configuration."""
    data = state.data_file
    if not data:
        raise CheckpointError(f"{path}: the checkpoint does not record its data file; pass --data")
    return Path(data)


def check_data(state: State, ckpt_path: Path, split: Split, model: CNN, force: bool) -> None:
    """Refuse data the model cannot read; refuse another data set (fingerprint) unless force."""
    want = tuple(model.spec.input_shape)
    if tuple(split.image_shape) + (split.channels,) != want or split.num_classes != model.spec.classes:
        raise CheckpointError(f"{ckpt_path}: the model takes {want[0]}x{want[1]} images in {model.spec.classes} "
                              f"classes, {split.path} has {split.image_shape[0]}x{split.image_shape[1]} images "
                              f"in {split.num_classes}")
    if state.data_fingerprint not in (split.fingerprint, split.legacy_fingerprint):
        msg = (f"{ckpt_path}: trained on another data set ({state.dataset}, fingerprint "
               f"{state.data_fingerprint[:12]}) than {split.path} ({split.dataset}, fingerprint "
               f"{split.fingerprint[:12]})")
        if not force:
            raise CheckpointError(f"{msg}; use --force to use it anyway")
        log.warning("warning: %s", msg)
