"""What a trained model is given: images checked in one place, and standardised as in training.

    x, single = model_input(images, (28, 28, 1), norm)         # (N, 28, 28, 1) float32

Both ``dpcnn.load(...).predict`` and ``python -m dpcnn.predict`` pass every array through
``check_images``: one image, (H, W) grey or (H, W, C), or N of them, (N, H, W) grey or (N, H, W, C);
an integer dtype holds pixel values 0-255, a float dtype intensities in [0, 1] (x / 255). Anything
else (float pixels in 0-255, NaN, bool, strings, another size) is refused in one line, never
classified into saturated probabilities. ``normalisation`` finds the mean and std to standardise
with: those of the data file the model was trained on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checkpoint import CheckpointError, State, check_data, recorded_data_path
from .cli import UserError
from .datasets import DATASETS
from .h5format import Split, standardise
from .model import CNN

log = logging.getLogger("dpcnn")

# Pixel statistics of the MNIST training images / 255 (what `dpcnn.data prepare` stores),
# used only when the data file a MNIST checkpoint was trained on is not at hand.
MNIST_MEAN, MNIST_STD = 0.1306604762738429, 0.30810780385646264
FLOAT_SLACK = 1e-3      # floats this far outside [0, 1] are rounding, and clipped; further is an error


class InputError(UserError):
    """Images a model cannot be given (one-line message naming them)."""


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


def check_images(a, shape: tuple[int, int, int], name: str = "images") -> tuple[np.ndarray, float, bool]:
    """The one check of images for a model of input shape (H, W, C); InputError naming `name` else.

    Returns (the batch (N, H, W, C): integers as given, floats clipped to [0, 1]; the value of full
    intensity, 255 or 1; whether `a` was one image)."""
    a = np.asarray(a)
    batch, single = as_batch(a, shape)
    if batch is None or len(batch) == 0:
        raise InputError(f"{name}: array of shape {a.shape}, expected {shapes_text(shape)}")
    if np.issubdtype(batch.dtype, np.integer):
        if batch.dtype != np.uint8 and (batch.min() < 0 or batch.max() > 255):
            raise InputError(f"{name}: integer pixel values must be 0-255, found {batch.min()}..{batch.max()}")
        return batch, 255.0, single
    if np.issubdtype(batch.dtype, np.floating):
        if not np.isfinite(batch).all():
            raise InputError(f"{name}: array holds NaN or infinite values")
        if batch.min() < -FLOAT_SLACK or batch.max() > 1 + FLOAT_SLACK:
            raise InputError(f"{name}: float values must be intensities in [0, 1], found "
                             f"{batch.min():.3g}..{batch.max():.3g} (give uint8 for 0-255)")
        return np.clip(batch, 0, 1), 1.0, single
    raise InputError(f"{name}: array dtype {a.dtype}, expected an integer (0-255) or float ([0, 1]) dtype")


@dataclass
class Normalisation:
    mean: float
    std: float
    class_names: list[str]
    source: str                 # where mean and std came from


def model_input(a, shape: tuple[int, int, int], norm: Normalisation, name: str = "images"
                ) -> tuple[np.ndarray, bool]:
    """Images checked (`check_images`) and standardised as in training -> ((N, H, W, C) float32,
    whether `a` was one image)."""
    batch, full, single = check_images(a, shape, name)
    return standardise(batch, norm.mean, norm.std, scale=full), single


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
