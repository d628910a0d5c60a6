"""What a trained model is given: images prepared as its training images were, checked in one place,
and standardised as in training.

    prep = Preprocess(model.spec.input_shape, norm)
    x, single = prep(images)              # (N, H, W, C) float32, the model's input

Both ``dpcnn.load(...).predict`` and ``python -m dpcnn.predict`` go through ``Preprocess``. What
it takes:

- image files (a path) and Pillow images: prepared by the recipe of the data the model was
  trained on (``h5format.recipe_of``, stored in the data file and carried into every checkpoint):
  ``resize``, converted to the model's colour and resized to its H x W as ``prepare
  --from-folder`` made its training images; ``mnist``, a digit cropped, scaled and centred as
  MNIST's were (models trained on MNIST and Fashion-MNIST);
- arrays of the model's input shape: one image, (H, W) grey or (H, W, C), or N of them, (N, H, W)
  grey or (N, H, W, C), taken as already prepared (``check_images``). An integer dtype holds pixel
  values 0-255, a float dtype intensities in [0, 1] (x / 255). Anything else (float pixels in
  0-255, NaN, bool, strings) is refused in one line, never classified into saturated probabilities;
- arrays of the original images' size (when ``originals``, as from Python): one image, (h, w) grey
  or (h, w, 1|3|4) grey, RGB or RGBA, or N of them, (N, h, w) or (N, h, w, 1|3|4), prepared by the
  recipe as an image file is;
- a list of any of these, each item one image (or a batch of the model's shape).

``normalisation`` finds the mean and std (per channel) to standardise with, the class names and
the recipe: those stored in the checkpoint, else those of the data file it was trained on.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checkpoint import CheckpointError, State, check_data, recorded_data_path
from .datasets import DATASETS
from .h5format import COLOR_OF_CHANNELS, Split, standardise
from .images import PIL_MISSING, InputError, folder_image, grey_levels, mnist_style, open_image
from .model import CNN

log = logging.getLogger("dpcnn")

# Pixel statistics of the MNIST training images / 255 (what `dpcnn.data prepare` stores),
# used only when neither the checkpoint nor the data file it was trained on has them.
MNIST_MEAN, MNIST_STD = 0.1306604762738429, 0.30810780385646264
FLOAT_SLACK = 1e-3      # floats this far outside [0, 1] are rounding, and clipped; further is an error
STYLES = ("auto", "mnist", "resize")
MODES = {1: "L", 3: "RGB", 4: "RGBA"}   # Pillow's mode of an array image (h, w, channels)

__all__ = ["InputError", "Normalisation", "Preprocess", "check_images", "normalisation"]


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


def check_pixels(a: np.ndarray, name: str) -> tuple[np.ndarray, float]:
    """Pixel values: integers 0-255 or floats in [0, 1] -> (the array: integers as given, floats
    clipped to [0, 1]; the value of full intensity, 255 or 1). InputError naming `name` else."""
    if np.issubdtype(a.dtype, np.integer):
        if a.dtype != np.uint8 and a.size and (a.min() < 0 or a.max() > 255):
            raise InputError(f"{name}: integer pixel values must be 0-255, found {a.min()}..{a.max()}")
        return a, 255.0
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise InputError(f"{name}: array holds NaN or infinite values")
        if a.size and (a.min() < -FLOAT_SLACK or a.max() > 1 + FLOAT_SLACK):
            raise InputError(f"{name}: float values must be intensities in [0, 1], found "
                             f"{a.min():.3g}..{a.max():.3g} (give uint8 for 0-255)")
        return np.clip(a, 0, 1), 1.0
    raise InputError(f"{name}: array dtype {a.dtype}, expected an integer (0-255) or float ([0, 1]) dtype")


def check_images(a, shape: tuple[int, int, int], name: str = "images") -> tuple[np.ndarray, float, bool]:
    """The one check of images of the model's input shape (H, W, C); InputError naming `name` else.

    Returns (the batch (N, H, W, C): integers as given, floats clipped to [0, 1]; the value of full
    intensity, 255 or 1; whether `a` was one image)."""
    a = np.asarray(a)
    batch, single = as_batch(a, shape)
    if batch is None or len(batch) == 0:
        raise InputError(f"{name}: array of shape {a.shape}, expected {shapes_text(shape)}")
    batch, full = check_pixels(batch, name)
    return batch, full, single


def as_uint8(a: np.ndarray, name: str) -> np.ndarray:
    """Pixel values (check_pixels) -> uint8 0-255 (floats x 255, rounded)."""
    a, full = check_pixels(a, name)
    return a.astype(np.uint8) if full == 255.0 else np.rint(a * 255.0).astype(np.uint8)


@dataclass
class Normalisation:
    """What a model's inputs are made with: the data it was trained on, or its checkpoint's copy."""

    mean: np.ndarray            # (C,) per channel: of the training pixels / 255
    std: np.ndarray             # (C,)
    class_names: list[str]
    recipe: dict                # how an image became a training row (h5format.recipe_of)
    source: str                 # where all this came from

    @classmethod
    def of_split(cls, s: Split, source: str) -> Normalisation:
        return cls(s.channel_mean, s.channel_std, list(s.class_names), dict(s.recipe), source)


def _pil_image_class():
    """PIL.Image.Image when Pillow is already imported (a program holding Pillow images has), else None."""
    module = sys.modules.get("PIL.Image")
    return getattr(module, "Image", None)


def _is_image(item) -> bool:
    """An image file (a path) or a Pillow image: one image to prepare by the recipe."""
    cls = _pil_image_class()
    return isinstance(item, (str, os.PathLike)) or (cls is not None and isinstance(item, cls))


def style_of(style: str, recipe: dict, shape: tuple[int, int, int], flag: str = "--preprocess") -> str:
    """How image files become inputs: `style` (auto: the recipe's), checked against the model's shape."""
    H, W, C = shape
    chosen = recipe["kind"] if style == "auto" else style
    if style == "auto" and (C != 1 or H != W):
        chosen = "resize"                              # MNIST-style images are square and grey
    if chosen not in ("mnist", "resize"):
        raise InputError(f"{flag} {style}: expected one of {', '.join(STYLES)}")
    if chosen == "mnist" and (C != 1 or H != W):
        raise InputError(f"{flag} mnist: the model takes {H}x{W}x{C} inputs; MNIST-style images are square and "
                         f"grey (use {flag} resize)")
    return chosen


class Preprocess:
    """The one way images become a model's input (see the module's docstring): image files, Pillow
    images and arrays, prepared by the recipe of its training data, checked, standardised."""

    def __init__(self, shape: tuple[int, int, int], norm: Normalisation, style: str = "auto"):
        self.shape: tuple[int, int, int] = (int(shape[0]), int(shape[1]), int(shape[2]))
        self.norm = norm
        self.style = style_of(style, norm.recipe, self.shape)
        C = self.shape[2]
        self.color = norm.recipe.get("color") if norm.recipe["kind"] == "resize" else COLOR_OF_CHANNELS.get(C)

    def __call__(self, images, name: str = "images", originals: bool = True) -> tuple[np.ndarray, bool]:
        """Images -> (the model's input (N, H, W, C) float32, whether one image was given). With
        `originals` false an array must have the model's input shape (``.npy`` files of the command)."""
        if isinstance(images, (list, tuple)) and any(_is_image(i) or isinstance(i, np.ndarray) for i in images):
            parts = [self(item, f"{name}[{k}]", originals)[0] for k, item in enumerate(images)]
            return np.concatenate(parts), False
        if _is_image(images):
            return self.standardise(self.original(images, name)[None], 255.0), True
        a = np.asarray(images)
        if as_batch(a, self.shape)[0] is not None or not originals:
            batch, full, single = check_images(a, self.shape, name)
            return self.standardise(batch, full), single
        ones, single = self._split(a, name)
        u8 = np.stack([self.original(one, name if single else f"{name}[{k}]") for k, one in enumerate(ones)])
        return self.standardise(u8, 255.0), single

    def standardise(self, batch: np.ndarray, full: float) -> np.ndarray:
        """(N, H, W, C) pixels of full intensity `full` -> the model's input, as in training."""
        return standardise(batch, self.norm.mean, self.norm.std, scale=full)

    def original(self, item, name: str) -> np.ndarray:
        """One original image (a path, a Pillow image, or an array (h, w[, 1|3|4])) -> (H, W, C) uint8,
        made as the model's training images were."""
        if isinstance(item, (str, os.PathLike)):
            return open_image(Path(item), item, lambda im: self._from_pil(im, str(item)))
        cls = _pil_image_class()
        if cls is not None and isinstance(item, cls):
            return self._from_pil(item, name)
        a = np.asarray(item)
        a = a[..., None] if a.ndim == 2 else a
        if a.ndim != 3 or a.shape[2] not in MODES or min(a.shape[:2]) < 1:
            raise InputError(f"{name}: array of shape {np.shape(item)}, expected one image (h, w) or (h, w, 1|3|4)")
        try:
            from PIL import Image
        except ImportError:
            raise InputError(f"{name}: {PIL_MISSING}") from None
        u8 = as_uint8(a, name)
        return self._from_pil(Image.fromarray(u8[..., 0] if a.shape[2] == 1 else u8, MODES[a.shape[2]]), name)

    def _from_pil(self, im, name: str) -> np.ndarray:
        H, W, C = self.shape
        if self.style == "mnist":
            return mnist_style(grey_levels(im), H, name)[..., None]
        if self.color is None:
            raise InputError(f"{name}: the model takes {C}-channel inputs, which images do not hold; "
                             f"give an array (N, {H}, {W}, {C})")
        x = folder_image(im, (H, W), self.color)
        return x if x.ndim == 3 else x[..., None]

    def _split(self, a: np.ndarray, name: str) -> tuple[list[np.ndarray], bool]:
        """An array of original images -> (the images, whether it was one)."""
        if a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (1, 3, 4)):
            return [a], True
        if (a.ndim == 3 or (a.ndim == 4 and a.shape[-1] in (1, 3, 4))) and len(a):
            return list(a), False
        raise InputError(f"{name}: array of shape {a.shape}, expected {shapes_text(self.shape)}, or images of "
                         "another size: (h, w), (h, w, 1|3|4), (N, h, w) or (N, h, w, 1|3|4)")


def normalisation(state: State, ckpt_path: Path, model: CNN, data: Path | None = None,
                  force: bool = False) -> Normalisation:
    """Mean and std per channel, class names and recipe: from `data` when given, else from the
    checkpoint, else (a checkpoint of an older dpcnn) from the recorded data file, else MNIST's."""
    if data is not None:
        if not Path(data).is_file():
            raise CheckpointError(f"{data}: no such data file (needed for the pixel mean and std)")
        with Split(data, "test") as s:
            check_data(state, ckpt_path, s, model, force)
            return Normalisation.of_split(s, str(data))
    stored = _stored(state, model)
    if stored is not None:
        return stored
    data = recorded_data_path(state, ckpt_path) if state.config.get("data") else None
    if data is not None and Path(data).is_file():
        with Split(data, "test") as s:
            check_data(state, ckpt_path, s, model, force)
            return Normalisation.of_split(s, str(data))
    dataset = state.config.get("dataset")
    if dataset == "mnist":
        log.info("data file %s not found: using the MNIST pixel mean and std", data)
        return Normalisation(np.array([MNIST_MEAN]), np.array([MNIST_STD]), list(DATASETS["mnist"].class_names),
                             {"kind": "mnist", "size": [28, 28]}, "MNIST constants")
    raise CheckpointError(f"{ckpt_path}: its data file {data} is missing and it was trained on "
                          f"{dataset or 'an unknown data set'}, whose pixel mean and std are needed; "
                          "pass --data with the prepared data file (data= in dpcnn.load)")


def _stored(state: State, model: CNN) -> Normalisation | None:
    """What the checkpoint's facts hold of its training data (``preprocessing``, see
    h5format.Split.preprocessing), or None when they hold nothing usable (an older dpcnn's)."""
    p = state.config.get("preprocessing")
    C = model.spec.input_shape[2]
    if not isinstance(p, dict):
        return None
    try:
        mean, std = np.asarray(p["mean"], np.float64), np.asarray(p["std"], np.float64)
        names, recipe = [str(n) for n in p["class_names"]], dict(p["recipe"])
        ok = mean.shape == std.shape == (C,) and (std > 0).all() and len(names) == model.spec.classes \
            and recipe.get("kind") in ("mnist", "resize")
    except (KeyError, TypeError, ValueError):
        return None
    return Normalisation(mean, std, names, recipe, "checkpoint") if ok else None
