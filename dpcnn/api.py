"""The Python API: classify arrays with a trained checkpoint, export its weights, train from Python.

    import dpcnn
    clf = dpcnn.load("runs/latest/best.h5")     # the model and its run's normalisation
    clf.predict(images)                         # (N,) class indices
    clf.predict_proba(images)                   # (N, K) probabilities
    clf.class_names                             # ['0', '1', ...]
    clf.export_npz("weights.npz")               # layer name -> array, for use elsewhere

    dpcnn.fit(dpcnn.Config(epochs=2, out="runs/api"))     # the trainer; under mpirun on every rank

``images`` may be uint8 (pixel values 0-255) or float (intensities in [0, 1]), shaped (H, W),
(N, H, W) or (N, H, W, C); they are standardised with the mean and std of the data the model was
trained on, as in training. ``fit`` takes the same ``Config`` the command line builds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checkpoint import CheckpointError, State, check_data, load_model, recorded_data_path
from .cli import EXIT_ERROR, UserError, report_error, setup_logging
from .datasets import DATASETS
from .h5format import Split, standardise
from .layers import softmax
from .model import CNN

log = logging.getLogger("dpcnn")

# Pixel statistics of the MNIST training images / 255 (what `dpcnn.data prepare` stores),
# used only when the data file a MNIST checkpoint was trained on is not at hand.
MNIST_MEAN, MNIST_STD = 0.1306604762738429, 0.30810780385646264


def as_batch(a: np.ndarray, shape: tuple[int, int, int]) -> tuple[np.ndarray | None, bool]:
    """Images for a model of input shape (H, W, C): one, (H, W, C) or grey (H, W), or N of them,
    (N, H, W, C) or grey (N, H, W) -> ((N, H, W, C), whether it was one image); (None, False) for
    any other shape."""
    H, W, C = shape
    single = a.shape == (H, W, C) or (C == 1 and a.shape == (H, W))
    if single:
        a = a[None]
    if C == 1 and a.ndim == 3:
        a = a[..., None]
    return (a, single) if a.ndim == 4 and a.shape[1:] == (H, W, C) else (None, False)


def shapes_text(shape: tuple[int, int, int]) -> str:
    """The shapes as_batch takes, in words."""
    H, W, C = shape
    if C == 1:
        return f"({H}, {W}), ({H}, {W}, 1), (N, {H}, {W}) or (N, {H}, {W}, 1)"
    return f"({H}, {W}, {C}) or (N, {H}, {W}, {C})"


@dataclass
class Normalisation:
    mean: float
    std: float
    class_names: list[str]
    source: str                 # where mean and std came from


def normalisation(state: State, ckpt_path: Path, model: CNN, data: Path | None = None,
                  force: bool = False) -> Normalisation:
    """Mean, std and class names: from `data`, else the recorded data file, else MNIST's values."""
    explicit = data is not None
    if not explicit:
        data = recorded_data_path(state, ckpt_path) if state.config.get("data") else None
    if data is not None and Path(data).is_file():
        with Split(data, "test") as s:
            check_data(state, ckpt_path, s, model, force)
            return Normalisation(s.mean, s.std, list(s.class_names), str(data))
    if explicit:
        raise CheckpointError(f"{data}: no such data file (needed for the pixel mean and std)")
    dataset = state.config.get("dataset")
    if dataset == "mnist":
        log.info("data file %s not found: using the MNIST pixel mean and std", data)
        return Normalisation(MNIST_MEAN, MNIST_STD, list(DATASETS["mnist"].class_names), "MNIST constants")
    raise CheckpointError(f"{ckpt_path}: its data file {data} is missing and it was trained on "
                          f"{dataset or 'an unknown data set'}, whose pixel mean and std are needed; "
                          "pass --data with the prepared data file (data= in dpcnn.load)")


class Classifier:
    """A trained CNN with the normalisation of the data it was trained on."""

    def __init__(self, model: CNN, norm: Normalisation, state: State, path: Path):
        self.model, self.norm, self.state, self.path = model, norm, state, path
        self.class_names = norm.class_names
        self.spec = model.spec

    def _inputs(self, images) -> np.ndarray:
        """uint8 0-255 or float 0-1, (H, W), (N, H, W) or (N, H, W, C) -> standardised (N, H, W, C)."""
        a = as_batch(np.asarray(images), self.spec.input_shape)[0]
        if a is None:
            raise UserError(f"images of shape {np.shape(images)}, expected {shapes_text(self.spec.input_shape)}")
        if np.issubdtype(a.dtype, np.integer):
            if a.size and (a.min() < 0 or a.max() > 255):
                raise UserError(f"integer pixel values must be 0-255, found {a.min()}..{a.max()}")
            scale = 255.0
        elif np.issubdtype(a.dtype, np.floating):
            if not np.isfinite(a).all():
                raise UserError("images hold NaN or infinite values")
            scale = 1.0
        else:
            raise UserError(f"images of dtype {a.dtype}, expected integers (0-255) or floats (0-1)")
        return standardise(a, self.norm.mean, self.norm.std, scale=scale)          # as in training

    def predict_proba(self, images) -> np.ndarray:
        """(N, K) class probabilities (float64)."""
        return softmax(self.model.predict_logits(self._inputs(images)).astype(np.float64))

    def predict(self, images) -> np.ndarray:
        """(N,) the most probable class of each image."""
        return self.predict_proba(images).argmax(axis=1)

    def export_npz(self, path) -> Path:
        """Write the weights as a plain .npz: layer name ('conv1.w', ...) -> array, plus the spec,
        the normalisation and the class names as 0-d string arrays."""
        import json
        path = Path(path)
        extra = {"spec.json": json.dumps(self.spec.to_dict()), "class_names.json": json.dumps(self.class_names),
                 "mean": np.float64(self.norm.mean), "std": np.float64(self.norm.std)}
        np.savez(path, **{k: v.copy() for k, v in self.model.p.items()}, **extra)
        return path


def load(path, data=None, force: bool = False) -> Classifier:
    """A checkpoint -> a Classifier. data: the prepared data file for the pixel mean/std (default:
    the one the checkpoint was trained on; MNIST's values when that file is gone)."""
    path = Path(path)
    model, state = load_model(path)
    return Classifier(model, normalisation(state, path, model, None if data is None else Path(data), force),
                      state, path)


def export_npz(checkpoint, out) -> Path:
    """Shortcut: load(checkpoint).export_npz(out)."""
    return load(checkpoint).export_npz(out)


def check_everywhere(config, comm) -> None:
    """config.check() on every rank, and ConfigError on every rank when any rank's Config is bad
    (ranks may be given different Configs: the others must not go on to wait for them)."""
    from .config import ConfigError

    try:
        config.check()
        bad = ""
    except ConfigError as e:
        bad = str(e)
    if comm.size > 1:
        n = np.array([1.0 if bad else 0.0])
        comm.allreduce(n)
        if n[0] and not bad:
            raise ConfigError(f"{int(n[0])} other rank(s) were given a Config the command line would refuse")
    if bad:
        raise ConfigError(bad)


def fit(config, comm=None) -> int:
    """Train with a Config as ``python -m dpcnn.train`` does (run under mpirun, on every rank, it
    trains on all of them); the exit status: 0 done, 75 stopped by a signal with a checkpoint
    written. Errors raise (a UserError's message is the one line the command would print): a
    field the command line would refuse raises ConfigError naming it. Under MPI with more than
    one rank, an error only this rank has is printed and the job aborted (MPI_Abort), as the
    command does: the other ranks would otherwise wait for this one forever.

    When the program has not set up logging itself, rank 0 shows the command's lines on stderr
    and train.log receives them, as from the command line; that set-up is undone on return."""
    from .comm import SharedError, get_comm
    from .train import train

    comm = comm or get_comm(config.comm)
    check_everywhere(config, comm)          # a bad Config raises on every rank: nobody is left waiting
    root = logging.getLogger()
    ours = not root.handlers
    if ours:
        level = root.level
        setup_logging(quiet=False, rank=comm.rank)
    try:
        return train(config, comm)
    except SharedError:                     # every rank raises it: nobody is left waiting
        raise
    except BaseException as e:
        if comm.size > 1:
            report_error(e, prefix=f"rank {comm.rank}: ")
            comm.abort(EXIT_ERROR)
        raise
    finally:
        if ours:
            for h in root.handlers[:]:
                root.removeHandler(h)
            root.setLevel(level)
