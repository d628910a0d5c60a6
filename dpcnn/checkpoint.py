"""Checkpoints: HDF5 files that let a run continue exactly where it stopped.

A checkpoint holds the parameters by layer name, the optimizer's velocity by layer
name, the position in the sample order (epoch and next global batch), the global
step, the model spec, the full configuration, the data set's fingerprint, the
metrics so far and the dpcnn version. The sample order depends only on the seed
and the epoch, so these are the whole state: a resume on any number of ranks
follows the same order.

Files are written to a temporary name, flushed and fsynced, then renamed, so a
crash during a write never damages an earlier checkpoint. Every load checks what was
written: the SHA-256 of the weights and momentum (``arrays_sha256``, also a Fletcher-32
checksum per array) and that they are finite, so a flipped bit or a NaN is refused, naming
the file, by resume, evaluate and predict alike. Old checkpoints without the digest load
with the finiteness check only.

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
from .config import Config
from .data import Split
from .fileio import write_h5_atomic
from .model import CNN, ModelSpec

log = logging.getLogger(__name__)

FORMAT = "dpcnn-checkpoint"
VERSION = 1


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
        # Where the randomness after the initial weights comes from (dpcnn.data), all drawn from the
        # configuration and the position alone, so the file says how to continue on any rank count.
        a["sample_order"] = json.dumps({
            "order": "train_rows[numpy.random.default_rng([seed, epoch]).permutation(len(train_rows))]",
            "train_rows": "dpcnn.data.holdout(N, val_size, val_seed)[0] (all N rows when val_size is 0)",
            "augmentation": "dpcnn.data.Augment(shift, rotate, seed, scale): stream (seed, epoch, batch), "
                            "one draw per position in the global batch",
            "seed": s.config.get("seed"), "val_size": s.config.get("val_size"),
            "val_seed": s.config.get("val_seed"), "epoch": s.epoch, "next_batch": s.next_batch})
        a["arrays_sha256"] = arrays_digest(s)
        for group, arrays in (("params", s.params), ("velocity", s.velocity)):
            g = f.create_group(group)
            for name, v in arrays.items():       # Fletcher-32 on each chunk: damage is found on read
                g.create_dataset(name, data=v, chunks=v.shape or None, fletcher32=v.size > 0)

    return write_h5_atomic(path, fill)


def arrays_digest(s: State) -> str:
    """SHA-256 over the parameters and the velocity, by group and name: what a checkpoint stores
    to prove, on every load, that its arrays are the ones written."""
    h = hashlib.sha256()
    for group, arrays in (("params", s.params), ("velocity", s.velocity)):
        for name in sorted(arrays):
            v = np.ascontiguousarray(arrays[name])
            h.update(f"{group}/{name}:{v.dtype.str}:{v.shape}".encode())
            h.update(v.tobytes())
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
            if int(a["format_version"]) != VERSION:
                raise CheckpointError(f"{path}: checkpoint format {int(a['format_version'])}, "
                                      f"this dpcnn reads {VERSION}")
            params = {k: v[...] for k, v in f["params"].items()}
            velocity = {k: v[...] for k, v in f["velocity"].items()}
            stored_digest = a.get("arrays_sha256")
            s = State(params=params, velocity=velocity, epoch=int(a["epoch"]),
                      next_batch=int(a["next_batch"]), step=int(a["step"]),
                      spec=json.loads(a["spec"]), config=json.loads(a["config"]),
                      data_fingerprint=str(a["data_fingerprint"]), metrics=json.loads(a["metrics"]),
                      best_accuracy=float(a["best_accuracy"]), elapsed=float(a["elapsed"]),
                      version=str(a["dpcnn_version"]),
                      world_size=int(a["world_size"]), interval=json.loads(a.get("interval", "{}")))
        _check_contents(s)
        if stored_digest is not None and str(stored_digest) != arrays_digest(s):
            raise CheckpointError(f"{path}: damaged: its weights or momentum differ from what was written "
                                  "(SHA-256 mismatch)")
        bad = [f"{g}/{k}" for g, arrays in (("params", s.params), ("velocity", s.velocity))
               for k, v in arrays.items() if not np.isfinite(v).all()]
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
    for group, arrays in (("params", s.params), ("velocity", s.velocity)):
        got = {k: tuple(v.shape) for k, v in arrays.items()}
        if got != shapes:
            raise ValueError(f"{group} {got} do not match the saved model spec's {shapes}")
    if s.step < 0 or not isinstance(s.metrics, list) or not all(isinstance(m, dict) for m in s.metrics) \
            or not isinstance(s.interval, dict) or not isinstance(s.config, dict):
        raise ValueError("malformed step, metrics, interval or config attribute")


def check_compatible(s: State, path: Path, spec: ModelSpec, fingerprint: str, config: Config,
                     data: Path) -> None:
    """Refuse a checkpoint that belongs to another model, data set, sample order or schedule."""
    if ModelSpec.from_dict(s.spec) != spec:
        raise CheckpointError(f"{path}: saved for model {ModelSpec.from_dict(s.spec)}, "
                              f"this run builds {spec}")
    if s.data_fingerprint != fingerprint:
        raise CheckpointError(f"{path}: saved for another data set "
                              f"({s.config.get('dataset', '?')}, fingerprint {s.data_fingerprint[:12]}), "
                              f"this run reads {data} (fingerprint {fingerprint[:12]})")
    conflict = config.resume_conflict(s.config)
    if conflict:
        raise CheckpointError(f"{path}: {conflict}; resume with the same setting to continue "
                              "the same run, or give another --out for a new one")


# ----------------------------------------------------------------------------- for evaluate and predict


def load_model(path: Path) -> tuple[CNN, State]:
    """A checkpoint -> (the CNN with its saved parameters, the State). CheckpointError if unreadable
    or if its arrays do not fit its spec (``load`` checks both)."""
    state = load(path)
    model = CNN(ModelSpec.from_dict(state.spec))
    for name, v in model.p.items():
        v[...] = state.params[name]
    return model, state


def recorded_data_path(state: State, path: Path) -> Path:
    """The data file the checkpoint was trained on, from its configuration."""
    data = state.config.get("data")
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
    if state.data_fingerprint != split.fingerprint:
        msg = (f"{ckpt_path}: trained on another data set ({state.config.get('dataset', '?')}, fingerprint "
               f"{state.data_fingerprint[:12]}) than {split.path} ({split.dataset}, fingerprint "
               f"{split.fingerprint[:12]})")
        if not force:
            raise CheckpointError(f"{msg}; use --force to use it anyway")
        log.warning("warning: %s", msg)
