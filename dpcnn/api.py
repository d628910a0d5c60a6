"""The Python API: classify arrays with a trained checkpoint, export its weights, train from Python.

    import dpcnn
    clf = dpcnn.load("runs/latest/best.h5")     # the model and its run's normalisation
    clf.predict(images)                         # (N,) class indices
    clf.predict_proba(images)                   # (N, K) probabilities
    clf.class_names                             # ['0', '1', ...]
    clf.export_npz("weights.npz")               # layer name -> array, for use elsewhere

    dpcnn.fit(dpcnn.Config(epochs=2, out="runs/api"))     # the trainer; under mpirun on every rank

``images`` may be uint8 (pixel values 0-255) or float (intensities in [0, 1]), shaped (H, W),
(N, H, W) or (N, H, W, C); anything else is refused (``dpcnn.inputs.check_images``, the check the
predict command makes too). They are standardised with the mean and std of the data the model was
trained on, as in training. ``fit`` takes the same ``Config`` the command line builds.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .checkpoint import State, load_model
from .cli import EXIT_ERROR, report_error
from .inputs import Normalisation, model_input, normalisation
from .layers import softmax
from .model import CNN

log = logging.getLogger("dpcnn")


class Classifier:
    """A trained CNN with the normalisation of the data it was trained on."""

    def __init__(self, model: CNN, norm: Normalisation, state: State, path: Path):
        self.model, self.norm, self.state, self.path = model, norm, state, path
        self.class_names = norm.class_names
        self.spec = model.spec

    def _inputs(self, images) -> np.ndarray:
        """uint8 0-255 or float 0-1, (H, W), (N, H, W) or (N, H, W, C) -> standardised (N, H, W, C),
        checked as the predict command checks its arrays (dpcnn.inputs.check_images)."""
        return model_input(images, self.spec.input_shape, self.norm)[0]          # as in training

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

    It trains inside the command's process set-up (``dpcnn.process.training_process``): when the
    program has not set up logging itself, rank 0 shows the command's lines on stderr and train.log
    receives them; from the main thread SIGTERM, SIGUSR1 and Ctrl-C stop it with a checkpoint
    (from another thread they are left to the program); everything it changes in the process
    (logging, signal handlers, the signal wake-up fd, BLAS threads) is restored on return."""
    from .comm import LaunchError, SharedError, get_comm
    from .process import training_process
    from .train import run

    try:
        comm = comm or get_comm(config.comm)
    except LaunchError as e:                # the launcher's other ranks wait for this one in MPI_Init
        report_error(e)
        e.end_launch(EXIT_ERROR)
        raise
    with training_process(comm, config.timeout, config.threads) as proc:
        check_everywhere(config, proc.comm)         # a bad Config raises on every rank: nobody is left waiting
        try:
            return run(config, proc)
        except SharedError:                         # every rank raises it: nobody is left waiting
            raise
        except BaseException as e:
            if comm.size > 1:
                report_error(e, prefix=f"rank {comm.rank}: ")
                comm.abort(EXIT_ERROR)
            raise
