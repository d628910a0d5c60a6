"""The Python API: classify images with a trained checkpoint, export its weights, train from Python.

    import dpcnn
    clf = dpcnn.load("runs/latest/best.h5")     # the model and how its training images were made
    clf.predict(images)                         # (N,) class indices
    clf.predict_proba(images)                   # (N, K) probabilities
    clf.predict(["cat.jpg", "dog.png"])         # image files, Pillow images, arrays of any size
    clf.class_names                             # ['0', '1', ...]
    clf.export_npz("weights.npz")               # layer name -> array, for use elsewhere

    dpcnn.fit(x_train, y_train, epochs=2, out="runs/arrays")          # NumPy arrays, as Keras takes them
    dpcnn.fit(dpcnn.Config(epochs=2, out="runs/api"))                  # a prepared file, the command's Config

``images`` are prepared as the model's training images were (``dpcnn.inputs.Preprocess``, the path
the predict command takes too): image files and Pillow images, and arrays of the original images'
size and colour, are converted and resized (or, for a model trained on MNIST, made MNIST-style);
arrays of the model's input shape, uint8 (0-255) or float (intensities in [0, 1]), are taken as they
are. Everything is then standardised with the per-channel mean and std of the training data, which
the checkpoint stores: the data file is not needed. ``fit`` trains as ``python -m dpcnn.train`` does,
under mpirun on every rank.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import State, load_model
from .cli import EXIT_ERROR, UserError, error_line, report_error
from .config import Config, ConfigError
from .datasets import DatasetInfo
from .h5format import COLOR_OF_CHANNELS, DataError, Split, array_sha256, test_holdout, verify, write_h5
from .inputs import InputError, Normalisation, Preprocess, as_uint8, normalisation
from .layers import softmax
from .model import CNN

log = logging.getLogger("dpcnn")


class Classifier:
    """A trained CNN with what its inputs are made with: the recipe and the per-channel normalisation
    of the data it was trained on."""

    def __init__(self, model: CNN, norm: Normalisation, state: State, path: Path, preprocess: str = "auto"):
        self.model, self.norm, self.state, self.path = model, norm, state, path
        self.class_names = norm.class_names
        self.spec = model.spec
        self.prep = Preprocess(model.spec.input_shape, norm, preprocess)

    def prepare(self, images, name: str = "images", originals: bool = True) -> np.ndarray:
        """Images (see the module's docstring) -> the model's input (N, H, W, C) float32, made as in
        training; InputError, one line naming `name`, for anything it cannot take."""
        return self.prep(images, name, originals)[0]

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """The model's input (N, H, W, C) float32 (`prepare`) -> (N, K) class probabilities (float64)."""
        return softmax(self.model.predict_logits(x).astype(np.float64))

    def predict_proba(self, images) -> np.ndarray:
        """(N, K) class probabilities (float64)."""
        return self.probabilities(self.prepare(images))

    def predict(self, images) -> np.ndarray:
        """(N,) the most probable class of each image."""
        return self.predict_proba(images).argmax(axis=1)

    def export_npz(self, path) -> Path:
        """Write the weights as a plain .npz: layer name ('conv1.w', ...) -> array, plus the spec, the
        class names and the recipe as 0-d JSON strings, and the per-channel mean and std, (C,)."""
        path = Path(path)
        extra: dict[str, Any] = {
            "spec.json": np.array(json.dumps(self.spec.to_dict())), "class_names.json": np.array(json.dumps(
                self.class_names)), "preprocess.json": np.array(json.dumps(self.norm.recipe)),
            "mean": np.asarray(self.norm.mean, np.float64), "std": np.asarray(self.norm.std, np.float64)}
        np.savez(path, **{k: v.copy() for k, v in self.model.p.items()}, **extra)
        return path


def load(path, data=None, force: bool = False, preprocess: str = "auto") -> Classifier:
    """A checkpoint -> a Classifier. data: a prepared data file whose pixel mean/std, class names and
    recipe to use instead of those the checkpoint stores (for a checkpoint of an older dpcnn that
    stores none, the file it was trained on is used, or MNIST's values when that file is gone).
    preprocess: how images become inputs, auto (the training data's recipe), mnist or resize."""
    path = Path(path)
    model, state = load_model(path)
    norm = normalisation(state, path, model, None if data is None else Path(data), force)
    return Classifier(model, norm, state, path, preprocess)


def export_npz(checkpoint, out) -> Path:
    """Shortcut: load(checkpoint).export_npz(out)."""
    return load(checkpoint).export_npz(out)


def check_everywhere(config, comm) -> None:
    """config.check() on every rank, and ConfigError on every rank when any rank's Config is bad
    (ranks may be given different Configs: the others must not go on to wait for them)."""
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


# ----------------------------------------------------------------------------- training on arrays


class ArrayData:
    """NumPy arrays as a prepared data file (h5format.write_h5): checked, the test split held out
    when none is given, and named by what they hold, data/<name>-<digest>.h5."""

    def __init__(self, x, y, x_test=None, y_test=None, *, test_split: float = 0.1, class_names=None,
                 name: str = "arrays", data_dir="data", preprocess: str = "resize", seed: int = 0):
        if (x_test is None) != (y_test is None):
            raise InputError("give x_test and y_test together (or neither: a seeded test_split is held out)")
        x, y = _images(x, "x"), _labels(y, "y")
        if len(x) != len(y):
            raise InputError(f"y: {len(y)} labels for {len(x)} images in x")
        if x_test is None:
            if not 0 < test_split < 1:
                raise InputError(f"test_split={test_split!r}: expected a fraction between 0 and 1")
            tr, te = test_holdout(len(y), test_split, seed, "x")
            (x, y), (xt, yt) = (x[tr], y[tr]), (x[te], y[te])
        else:
            xt, yt = _images(x_test, "x_test"), _labels(y_test, "y_test")
            if len(xt) != len(yt):
                raise InputError(f"y_test: {len(yt)} labels for {len(xt)} images in x_test")
            if xt.shape[1:] != x.shape[1:]:
                raise InputError(f"x_test: images of shape {xt.shape[1:]}, x's are {x.shape[1:]}")
        k = max(int(y.max(initial=0)), int(yt.max(initial=0))) + 1
        names = [str(c) for c in range(max(k, 2))] if class_names is None else [str(c) for c in class_names]
        if len(names) < k or len(names) > 256:
            raise InputError(f"class_names: {len(names)} names for labels 0..{k - 1} (at most 256 classes)")
        H, W, C = int(x.shape[1]), int(x.shape[2]), int(x.shape[3]) if x.ndim == 4 else 1
        if preprocess not in ("resize", "mnist") or (preprocess == "mnist" and (C != 1 or H != W)):
            raise InputError(f"preprocess={preprocess!r}: expected 'resize', or 'mnist' for square grey images")
        self.recipe = {"kind": "mnist", "size": [H, W]} if preprocess == "mnist" else \
            {"kind": "resize", "size": [H, W], "color": COLOR_OF_CHANNELS.get(C)}
        self.info = DatasetInfo(name=name, class_names=tuple(names))
        self.arrays = {"train": (x, y), "test": (xt, yt)}
        h = hashlib.sha256(json.dumps([name, names, self.recipe]).encode())
        for split in ("train", "test"):
            for a in self.arrays[split]:
                h.update(array_sha256(a).encode())
        self.digest = h.hexdigest()
        self.path = Path(data_dir) / f"{name}-{self.digest[:16]}.h5"

    def write(self) -> Path:
        """The file: written when missing; one already there is reused when it holds these arrays."""
        if self.path.exists():
            with Split(self.path, "train") as s:
                same = s.dataset == self.info.name and s.source_sha256 == {"arrays": self.digest}
            if same and verify(self.path):
                log.info("%s holds these arrays already", self.path)
                return self.path
            raise DataError(f"{self.path}: holds other data than the arrays given; move it away")
        write_h5(self.path, self.info, self.arrays, {"arrays": self.digest}, {"kind": "arrays"}, self.recipe)
        x, y = self.arrays["train"]
        log.info("wrote %s: %d train and %d test images of %s in %d classes", self.path, len(y),
                 len(self.arrays["test"][1]), "x".join(map(str, x.shape[1:])), len(self.info.class_names))
        return self.path


def _images(a, name: str) -> np.ndarray:
    """Images (N, H, W) or (N, H, W, C), integers 0-255 or floats in [0, 1] -> uint8, as stored."""
    a = np.asarray(a)
    if a.ndim not in (3, 4) or len(a) == 0 or (a.ndim == 4 and not 1 <= a.shape[3] <= 16):
        raise InputError(f"{name}: array of shape {a.shape}, expected images (N, H, W) or (N, H, W, C), N >= 1")
    return np.ascontiguousarray(as_uint8(a, name))


def _labels(a, name: str) -> np.ndarray:
    """Class indices (N,), integers 0..255 -> uint8."""
    a = np.asarray(a)
    if a.ndim == 2 and a.shape[1] > 1:
        raise InputError(f"{name}: array of shape {a.shape}: one-hot labels? give class indices, {name}.argmax(1)")
    if a.ndim != 1 or not (np.issubdtype(a.dtype, np.integer) or (a.size and np.array_equal(a, np.rint(a)))):
        raise InputError(f"{name}: expected class indices (N,) of integers, got {a.shape} {a.dtype}")
    if a.size and (a.min() < 0 or a.max() > 255):
        raise InputError(f"{name}: class indices must be 0..255, found {a.min()}..{a.max()}")
    return a.astype(np.uint8)


def share_arrays(comm, make) -> Path:
    """make() -> ArrayData on every rank; every rank must have been given the same arrays (compared
    by digest); rank 0 writes the file while the others wait. The file's path, on every rank; an
    error any rank has ends fit on every rank."""
    from .comm import SharedError, on_root

    data, bad = None, ""
    try:
        data = make()
    except UserError as e:
        bad = error_line(e)
    everyone = comm.allgather_obj((None if data is None else data.digest, bad)) if comm.size > 1 else [("", bad)]
    if bad:
        raise InputError(bad)
    refused = [r for r, (_, b) in enumerate(everyone) if b]
    if refused:
        raise SharedError(f"rank(s) {refused} were given arrays fit refuses: {everyone[refused[0]][1]}")
    other = [r for r, (d, _) in enumerate(everyone) if d != everyone[0][0]]
    if other:
        raise SharedError(f"rank(s) {other} were given other arrays than rank 0: give every rank the same arrays")
    assert data is not None
    return on_root(comm, data.write, "writing the arrays")


# ----------------------------------------------------------------------------- fit


def fit(x, y=None, *, comm=None, config: Config | None = None, x_test=None, y_test=None,
        validation_split: float | None = None, test_split: float = 0.1, class_names=None, name: str = "arrays",
        data_dir="data", preprocess: str = "resize", **settings) -> int:
    """Train as ``python -m dpcnn.train`` does; the exit status: 0 done, 75 stopped by a signal with a
    checkpoint written. Then ``dpcnn.load(RUN_DIR / "best.h5")`` classifies.

        fit(config)                               a Config: a prepared data file, every setting
        fit(x, y, epochs=4, out="runs/mine")      NumPy arrays, and any Config field by name

    Arrays: x (N, H, W) grey or (N, H, W, C), uint8 0-255 or float in [0, 1] (stored as uint8, x * 255
    rounded), y (N,) class indices 0..K-1. x_test, y_test: the test split; without them a seeded
    `test_split` of x is held out (as ``prepare --from-folder`` holds out its --test-fraction).
    validation_split: the fraction of the training rows held out for validation (``val_size``; rows
    drawn by ``val_seed``, not the last ones as in Keras). class_names: K names (default '0', '1', ...).
    preprocess: how the model prepares new images (``dpcnn.load(...).predict`` on files): "resize"
    (converted and resized, as image folders are), or "mnist" for digits made as MNIST's were.
    The arrays are written once, on rank 0, to data_dir/<name>-<digest>.h5 (a prepared file named by
    what it holds: the same arrays again reuse it, so the same call after a stop resumes), and
    training reads it as it reads any prepared file: the result is bitwise that of training on the
    same arrays prepared as a file. Under mpirun every rank passes the same arrays (compared by
    their SHA-256; ranks given different arrays are refused).

    Run under mpirun on every rank, it trains on all of them. Errors raise (a UserError's message is
    the one line the command would print): a field the command line would refuse raises ConfigError
    naming it. Under MPI with more than one rank, an error only this rank has is printed and the job
    aborted (MPI_Abort), as the command does: the other ranks would otherwise wait for this one forever.

    It trains inside the command's process set-up (``dpcnn.process.training_process``): when the
    program has not set up logging itself, rank 0 shows the command's lines on stderr and train.log
    receives them; from the main thread SIGTERM, SIGUSR1 and Ctrl-C stop it with a checkpoint
    (from another thread they are left to the program); everything it changes in the process
    (logging, signal handlers, the signal wake-up fd, BLAS threads) is restored on return."""
    from .comm import LaunchError, SharedError, get_comm
    from .process import training_process
    from .train import run

    if isinstance(x, Config):
        if y is not None or config is not None:
            raise TypeError("fit(config): give no y and no config= (and comm= by keyword)")
        cfg, make = (x.replace(**settings) if settings else x), None
    else:
        if y is None:
            raise TypeError("fit(x, y, ...): the labels y are missing (or give a Config: fit(config))")
        if "data" in settings or (config is not None and config.data is not None):
            raise ConfigError("fit(x, y): the arrays are the data; give no data=")
        if validation_split is not None:
            if "val_size" in settings:
                raise ConfigError("fit(x, y): give validation_split or val_size, not both")
            if not 0 <= validation_split < 1:
                raise ConfigError(f"validation_split={validation_split!r}: expected a fraction in [0, 1)")
        cfg = (config or Config()).replace(**settings)

        def make() -> ArrayData:
            return ArrayData(x, y, x_test, y_test, test_split=test_split, class_names=class_names, name=name,
                             data_dir=data_dir, preprocess=preprocess)
    try:
        comm = comm or get_comm(cfg.comm)
    except LaunchError as e:                # the launcher's other ranks wait for this one in MPI_Init
        report_error(e)
        e.end_launch(EXIT_ERROR)
        raise
    with training_process(comm, cfg.timeout, cfg.threads) as proc:
        if make is not None:                            # an error here raises on every rank
            data = share_arrays(proc.comm, make)
            cfg = cfg.replace(data=data)
            if validation_split is not None:
                with Split(data, "train") as s:
                    cfg = cfg.replace(val_size=round(validation_split * s.n))
        check_everywhere(cfg, proc.comm)         # a bad Config raises on every rank: nobody is left waiting
        try:
            return run(cfg, proc)
        except SharedError:                         # every rank raises it: nobody is left waiting
            raise
        except BaseException as e:
            if comm.size > 1:
                report_error(e, prefix=f"rank {comm.rank}: ")
                comm.abort(EXIT_ERROR)
            raise
