"""The prepared HDF5 file: its layout, reading it validated, verifying it, and writing it.

The file (written by ``write_h5``, from ``python -m dpcnn.data prepare``, or by anyone with h5py)
holds groups ``train`` and ``test``, each with ``images (N, H, W) uint8`` (or ``(N, H, W, C)``) and
``labels (N,) uint8``, chunked by rows. Root attributes: ``dataset``, ``class_names`` (JSON),
``format_version``, ``source_sha256`` (JSON, file name -> SHA-256 of the uncompressed IDX),
``mean`` and ``std`` (of training pixels / 255, float64), ``channel_mean`` and ``channel_std`` (the
same per channel, (C,) float64: what inputs are standardised with; files without them use ``mean``
and ``std`` for every channel), ``dpcnn_version``, ``made_from`` (JSON: what the file was prepared
from, so that a message can say how to prepare it again; see ``made_from``; files written before it
existed, or by other tools, lack it) and ``preprocess`` (JSON: how an image became a row of the
file, so that a model trained on it can prepare new images the same way; see ``recipe_of``). Each of the four
arrays has the attribute ``sha256``: the hex SHA-256 of its bytes in C order (``array_sha256``),
so ``verify`` can tell the data written from the data read; a file without them (written before
they existed, or by another tool) reads, but is "not verified". Every chunk also carries a
Fletcher-32 checksum, which h5py checks on every read.

A file at ``--out`` is replaced only by a file made the same way (``check_replaceable``): from
the same data set's IDX files, or from an image folder.

``verify(path)`` reads every array once and compares it with its ``sha256`` (MNIST: 55 MB, about
0.1 s from the page cache). It is meant for the trainer's rank 0 at start; ``prepare`` calls it
before calling a file up to date, and ``info`` prints its result.

What a rank reads of the file, batch by batch, is ``dpcnn.data``'s business. This module never
imports mpi4py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from collections.abc import Mapping
from pathlib import Path

import h5py
import numpy as np

from . import __version__
from .cli import UserError
from .datasets import DATASETS, DatasetInfo
from .fileio import WriteError, write_h5_atomic

FORMAT_VERSION: int = 1
SPLITS = ("train", "test")
# Root attributes that change what a model sees or says: part of the file's fingerprint.
INPUT_ATTRS = ("class_names", "mean", "std", "channel_mean", "channel_std", "preprocess")
ROW_CHUNK = 1024  # HDF5 chunk: (ROW_CHUNK, H, W) images


class DataError(UserError):
    """One-line, user-facing message naming the file and the problem."""


def default_data_path(dataset="mnist") -> Path:
    """Where `prepare` writes by default: data/<dataset>.h5 (relative to the working dir)."""
    return Path("data") / f"{dataset}.h5"


# ----------------------------------------------------------------------------- reading


def _open_h5(path: Path) -> h5py.File:
    """Open read-only with HDF5 file locking off, so many ranks can share the file."""
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a prepared HDF5 file (e.g. data/mnist.h5)")
    if not path.is_file():
        raise DataError(f"{path}: no such file; run `python -m dpcnn.data prepare` first")
    try:
        return h5py.File(path, "r", locking=False)
    except OSError as e:
        if "locking flag values don't match" in str(e):
            raise DataError(f"{path}: open elsewhere in this process (an h5py.File with file locking): close it "
                            "first") from None
        raise DataError(f"{path}: not a readable HDF5 file ({e})") from None


class Split:
    """One split ("train" or "test") of a prepared HDF5 file, opened read-only.

    Attributes: n, image_shape (H, W), channels (1 for (N, H, W) images, else C of (N, H, W, C)),
    num_classes, class_names, mean, std (of all training pixels / 255), channel_mean, channel_std
    ((C,) float64: per channel, what `standardise` uses), recipe (see `recipe_of`), dataset,
    fingerprint (hex SHA-256 of the data set name and its arrays' SHA-256s), source_sha256.
    Labels (N,) are held in memory; images are read on demand.
    """

    def __init__(self, path, split="train"):
        self.path, self.split = Path(path), split
        self._f = _open_h5(self.path)
        try:
            self._validate()
        except BaseException:
            self._f.close()
            raise

    def _fail(self, what: str):
        raise DataError(f"{self.path}: {what}")

    def _validate(self):
        f, a = self._f, self._f.attrs
        if str(a.get("format", "")) == "dpcnn-checkpoint":
            self._fail("is a dpcnn checkpoint, not a data file; give a prepared data file (e.g. data/mnist.h5)")
        if "format_version" not in a:
            self._fail("not a dpcnn data file (no format_version); run `python -m dpcnn.data prepare`")
        if str(a["format_version"]) != str(FORMAT_VERSION):
            self._fail(f"format version {a['format_version']}, this dpcnn reads {FORMAT_VERSION}; "
                       f"prepare it again: {self.remake}")
        missing = [k for k in ("dataset", "class_names", "source_sha256", "mean", "std") if k not in a]
        if missing:
            self._fail(f"missing attribute{'s'[:len(missing) > 1]} {', '.join(missing)} (see the README's "
                       "layout table)")
        try:
            self.dataset = str(a["dataset"])
            self.class_names = list(json.loads(a["class_names"]))
            self.source_sha256 = dict(json.loads(a["source_sha256"]))
            self.mean, self.std = float(a["mean"]), float(a["std"])
        except (KeyError, TypeError, ValueError) as e:
            self._fail(f"missing or malformed attribute ({e})")
        if not (np.isfinite(self.mean) and np.isfinite(self.std) and self.std > 0):
            self._fail(f"bad pixel statistics mean={self.mean} std={self.std}")
        if self.split not in SPLITS:
            raise DataError(f"split {self.split!r}: expected one of {', '.join(SPLITS)}")
        if self.split not in f or not {"images", "labels"} <= set(f[self.split]):
            self._fail(f"no {self.split}/images and {self.split}/labels")
        x, y = f[self.split]["images"], f[self.split]["labels"]
        if x.ndim not in (3, 4) or x.dtype != np.uint8 or (x.ndim == 4 and not 1 <= x.shape[3] <= 16):
            self._fail(f"{self.split}/images is {x.shape} {x.dtype}, expected (N, H, W) or (N, H, W, C) uint8")
        if y.shape != (x.shape[0],) or y.dtype != np.uint8:
            self._fail(f"{self.split}/labels is {y.shape} {y.dtype}, expected ({x.shape[0]},) uint8")
        too_few = _too_few_classes(self.class_names)
        if too_few:
            self._fail(f"{too_few} (the class_names attribute)")
        self._images, self.labels = x, self._read(lambda: y[...], "labels")
        self.num_classes = len(self.class_names)
        if len(self.labels) and self.labels.max() >= self.num_classes:
            self._fail(f"{self.split}/labels has label {self.labels.max()}, "
                       f"expected 0..{self.num_classes - 1}")
        self.n, self.image_shape = x.shape[0], tuple(x.shape[1:3])
        self.channels = x.shape[3] if x.ndim == 4 else 1
        self.channel_mean, self.channel_std = self._channel_stats()
        self.recipe = recipe_of(f, (*self.image_shape, self.channels))
        self.fingerprint, self.legacy_fingerprint = self._fingerprints()

    def _channel_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """The ``channel_mean`` and ``channel_std`` attributes, (C,) float64; a file without them
        (an older dpcnn's, or one written by hand) has ``mean`` and ``std`` for every channel."""
        a, C = self._f.attrs, self.channels
        if "channel_mean" not in a and "channel_std" not in a:
            return np.full(C, self.mean), np.full(C, self.std)
        try:
            m, s = (np.asarray(a[k], np.float64).reshape(-1) for k in ("channel_mean", "channel_std"))
        except (KeyError, TypeError, ValueError) as e:
            self._fail(f"missing or malformed attribute channel_mean or channel_std ({e})")
        if m.shape != (C,) or s.shape != (C,) or not (np.isfinite(m).all() and np.isfinite(s).all() and (s > 0).all()):
            self._fail(f"bad per-channel pixel statistics channel_mean={m.tolist()} channel_std={s.tolist()} "
                       f"for {C}-channel images")
        return m, s

    @property
    def preprocessing(self) -> dict:
        """What a model trained on this file needs to prepare new images as its training images were
        made (a run's facts carry it into every checkpoint): the recipe, the per-channel mean and std,
        the class names."""
        return {"recipe": self.recipe, "mean": self.channel_mean.tolist(), "std": self.channel_std.tolist(),
                "class_names": list(self.class_names)}

    def _fingerprints(self) -> tuple[str, str]:
        """(what the file holds: the SHA-256 of its arrays' own SHA-256s, which `verify` checks
        against the arrays, and of the attributes that shape a model's inputs and outputs (class
        names, pixel statistics, preprocessing); the name-and-source fingerprint of dpcnn's format 1
        checkpoints). A file without array digests (made by an older dpcnn) is told apart by its
        arrays' shapes."""
        f = self._f
        arrays = {f"{s}/{k}": f[s][k] for s in SPLITS if s in f for k in ("images", "labels") if k in f[s]}
        digests = {name: str(ds.attrs.get("sha256", "")) for name, ds in arrays.items()}
        shaping = {k: np.asarray(f.attrs[k]).tolist() for k in INPUT_ATTRS if k in f.attrs}
        what = {"dataset": self.dataset, "arrays": digests, "attrs": shaping} if all(digests.values()) else \
            {"dataset": self.dataset, "source_sha256": self.source_sha256, "attrs": shaping,
             "shapes": {name: list(ds.shape) for name, ds in arrays.items()}}
        legacy = {"dataset": self.dataset, "source_sha256": self.source_sha256}
        def digest(key: dict) -> str:
            return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

        return digest(what), digest(legacy)

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """Raw images of the sorted, distinct row indices idx (m,) -> (m, H, W) uint8.

        Reads the chunk-aligned blocks that hold wanted rows and keeps only those rows, so
        the result is all that stays in memory (see `_read_rows` for the why).
        """
        return self._read(lambda: _read_rows(self._images, idx), "images")

    def _read(self, read, what: str):
        """read(), with a damaged file (a chunk's checksum fails) reported as a DataError."""
        try:
            return read()
        except OSError as e:
            self._fail(f"cannot read {self.split}/{what} ({e}); the file is damaged: "
                       f"prepare it again: {self.remake}")

    @property
    def remake(self) -> str:
        """The command that prepares this file again, as it was made (see `made_from`)."""
        return remake_command(self.path, made_from(self._f))

    def standardise(self, u8: np.ndarray) -> np.ndarray:
        """Images (m, H, W) or (m, H, W, C) uint8 -> (m, H, W, C) float32, (x/255 - mean) / std per channel."""
        return standardise(u8, self.channel_mean, self.channel_std, scale=255.0)

    def read(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Contiguous rows [lo, hi): x (m, H, W, C) float32 standardised, y (m,) int64."""
        return (self.standardise(self._read(lambda: self._images[lo:hi], "images")),
                self.labels[lo:hi].astype(np.int64))

    def close(self):
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _read_rows(ds: h5py.Dataset, idx: np.ndarray, block: int = 4 * ROW_CHUNK) -> np.ndarray:
    """Rows idx (m,) sorted and distinct of a row-chunked dataset -> (m, *ds.shape[1:]).

    h5py's fancy indexing builds one hyperslab per row and is far slower than reading
    whole chunk-aligned blocks, so read each block that holds a wanted row and keep the
    wanted rows; extra memory is one block.
    """
    out = np.empty((len(idx), *ds.shape[1:]), ds.dtype)
    starts = np.arange(0, ds.shape[0], block)
    cuts = np.searchsorted(idx, np.append(starts, ds.shape[0]))
    for b in range(len(starts)):
        i, j = cuts[b], cuts[b + 1]
        if i == j:
            continue
        lo, hi = idx[i], idx[j - 1] + 1  # read only the span of wanted rows in this block
        out[i:j] = ds[lo:hi][idx[i:j] - lo]
    return out


def standardise(images: np.ndarray, mean, std, scale: float = 255.0) -> np.ndarray:
    """Images (m, H, W) or (m, H, W, C) with intensities in [0, scale] -> network input
    (m, H, W, C) float32 (C = 1 for grey), (x/scale - mean) / std, where mean and std, floats or
    (C,) per channel, are those of the training set's x/scale. Both are applied as float32
    factors computed in float64, one multiply and one subtract a pixel."""
    x = images.astype(np.float32)
    if x.ndim == 3:
        x = x[..., None]
    m, s = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    if m.size == 1 and s.size == 1:              # one channel, or one value for all: scalars
        m, s = m.reshape(()), s.reshape(())
    x *= (1.0 / (scale * s)).astype(np.float32)
    x -= (m / s).astype(np.float32)
    return x


def array_sha256(a: np.ndarray) -> str:
    """Hex SHA-256 of an array's bytes in C order: what the ``sha256`` attribute of each array holds."""
    return hashlib.sha256(np.ascontiguousarray(a).data).hexdigest()


def verify(path) -> bool:
    """Read every array of the prepared file `path` once and check it against its ``sha256``.

    Returns True when all four arrays (train/test images/labels) match, False when the file has
    no ``sha256`` attributes to compare with (made before they existed, or by another tool): it
    was still read whole, so every chunk's Fletcher-32 checksum passed. Raises DataError, one line
    naming the file, the split and the array, when the file is invalid, a chunk fails its
    checksum, or an array differs from what was written. MNIST: 55 MB read in blocks of 3 MB,
    about 0.1 s from the page cache.
    """
    complete = True
    for split in SPLITS:
        with Split(path, split) as s:       # validates the layout and reads the labels
            for name in ("images", "labels"):
                ds = s._f[split][name]
                want = ds.attrs.get("sha256")
                if name == "labels":
                    got = array_sha256(s.labels)
                else:
                    got = s._read(lambda ds=ds: _sha256_rows(ds), name)
                if want is None:
                    complete = False
                elif (want.decode() if isinstance(want, bytes) else str(want)) != got:
                    s._fail(f"{split}/{name} differs from the data written (its SHA-256 does not match); "
                            f"the file is damaged: prepare it again: {s.remake}")
    return complete


def _sha256_rows(ds: h5py.Dataset, block: int = 4 * ROW_CHUNK) -> str:
    """array_sha256 of a row-chunked dataset, read a block of rows at a time."""
    h = hashlib.sha256()
    for i in range(0, ds.shape[0], block):
        h.update(np.ascontiguousarray(ds[i:i + block]).data)
    return h.hexdigest()


def info_lines(path) -> list[str]:
    """Human-readable summary of a prepared file: attributes, sizes and class counts."""
    lines: list[str] = []
    for split in SPLITS:
        with Split(path, split) as s:
            if not lines:
                lines += [f"file           {s.path}", f"dataset        {s.dataset}",
                          f"format_version {FORMAT_VERSION}", f"fingerprint    {s.fingerprint}",
                          f"mean, std      {s.mean:.6f}, {s.std:.6f}" + (
                              "" if s.channels == 1 else "; per channel " + ", ".join(
                                  f"{m:.6f}/{d:.6f}" for m, d in zip(s.channel_mean, s.channel_std))),
                          f"preprocess     {recipe_text(s.recipe)}",
                          f"classes        {', '.join(s.class_names)}",
                          f"made by        {s.remake}"]
                lines += [f"sha256         {k} {v}" for k, v in s.source_sha256.items()]
            counts = np.bincount(s.labels, minlength=s.num_classes)
            shape = s.image_shape + ((s.channels,) if s.channels > 1 else ())
            lines.append(f"{split:<14} {s.n} x {'x'.join(map(str, shape))}, "
                         f"per class: {' '.join(map(str, counts))}")
    return lines


def _too_few_classes(class_names) -> str:
    """What is wrong with a data set of fewer than 2 classes (nothing to tell apart), else ''."""
    if len(class_names) >= 2:
        return ""
    has = f"one class ({class_names[0]!r})" if class_names else "no classes"
    return f"has {has}; a classifier needs at least 2"


# ----------------------------------------------------------------------------- what made a file

def made_from(f: h5py.File) -> dict:
    """What the open data file was prepared from: its ``made_from`` attribute, one of

        {"kind": "idx", "dataset": "mnist", "source": None | "/abs/dir" | "https://..."}
        {"kind": "folder", "folder": "/abs/photos", "test_folder": None | "/abs/dir",
         "test_fraction": 0.1 | None, "size": [H, W], "color": "grey" | "rgb"}   (what the file holds)
        {"kind": "arrays"}                       (dpcnn.fit's file of NumPy arrays)

    or, for a file without it, what its ``source_sha256`` says: image folders store the digests
    of their train and test folders, IDX data sets those of their four files (folder and source
    then unknown: None). A ``made_from`` that is not as documented counts as missing."""
    a = f.attrs
    try:
        made = json.loads(a["made_from"])
        if _documented(made):
            return made
    except (KeyError, TypeError, ValueError):
        pass
    try:
        keys = set(json.loads(a["source_sha256"]))
    except (KeyError, TypeError, ValueError):
        keys = set()
    if keys == set(SPLITS):
        made = {"kind": "folder", "folder": None, "test_folder": None, "test_fraction": None}
        x = f.get("train/images")
        if isinstance(x, h5py.Dataset) and x.ndim in (3, 4):
            made.update(size=list(x.shape[1:3]), color="rgb" if x.ndim == 4 else "grey")
        return made
    dataset = str(a.get("dataset", "mnist"))
    info = DATASETS.get(dataset)
    try:
        sources = dict(json.loads(a["source_sha256"]))
    except (KeyError, TypeError, ValueError):
        sources = {}
    if info is not None and sources == dict(info.sha256):      # that data set's pinned IDX files
        return {"kind": "idx", "dataset": dataset, "source": None}
    return {"kind": "unknown", "dataset": dataset}             # written by hand or another tool


def _documented(made) -> bool:
    """Whether a ``made_from`` read from a file has the fields and types `made_from` documents."""
    if not isinstance(made, dict):
        return False

    def text(k):
        return made.get(k) is None or isinstance(made[k], str)

    def integer(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if made.get("kind") == "idx":
        return isinstance(made.get("dataset"), str) and text("source")
    if made.get("kind") == "arrays":
        return True
    size, fraction = made.get("size"), made.get("test_fraction")
    return (made.get("kind") == "folder" and text("folder") and text("test_folder")
            and made.get("color") in (None, "grey", "rgb")
            and (fraction is None or integer(fraction) or isinstance(fraction, float))
            and (size is None or isinstance(size, list) and len(size) == 2 and all(map(integer, size))))


def remake_command(path, made: dict) -> str:
    """The command that prepares the file at `path` again from what `made` (``made_from``) records."""
    q = shlex.quote
    if made.get("kind") == "unknown":
        return f"(not made by prepare: make {q(str(path))} again as it was made)"
    if made.get("kind") == "arrays":
        return f"rm {q(str(path))}, then dpcnn.fit(x, y, ...) with the same arrays writes it again"
    cmd = "python -m dpcnn.data prepare"
    if made.get("kind") == "folder":
        cmd += f" --from-folder {q(made['folder']) if made.get('folder') else 'DIR'}"
        if made.get("test_folder"):
            cmd += f" --test-folder {q(made['test_folder'])}"
        elif made.get("test_fraction") not in (None, 0.1):
            cmd += f" --test-fraction {made['test_fraction']:g}"
        size, color = made.get("size"), made.get("color")
        if size:                # what the file holds, whatever the defaults: the same file again
            cmd += f" --size {size[0]}x{size[1]}"
        if color:
            cmd += f" --color {color}"
        unknown = "" if made.get("folder") else " (DIR: the image folder it was made from)"
        return cmd + f" --out {q(str(path))}{unknown}"
    if made.get("dataset", "mnist") != "mnist":
        cmd += f" --dataset {q(made['dataset'])}"
    if made.get("source"):
        cmd += f" --source {q(made['source'])}"
    return cmd + f" --out {q(str(path))} --force"


# ----------------------------------------------------------------------------- how an image became a row

def recipe_of(f: h5py.File, shape: tuple[int, int, int]) -> dict:
    """How an image became a row of the open data file of images (H, W, C) = shape: its ``preprocess``
    attribute, one of

        {"kind": "mnist", "size": [H, W]}        grey, the digit cropped, scaled into a box and centred
                                                  by its centre of mass, as MNIST was made (H == W)
        {"kind": "resize", "size": [H, W], "color": "grey" | "rgb" | None}
                                                  upright (EXIF), converted to the colour and resized
                                                  to H x W (Lanczos), as ``prepare --from-folder``
                                                  does; None: C channels that no image file holds

    or, for a file without it (or with one not as documented), `default_recipe`."""
    try:
        recipe = json.loads(f.attrs["preprocess"])
        if _recipe_ok(recipe, shape):
            return recipe
    except (KeyError, TypeError, ValueError):
        pass
    return default_recipe(str(f.attrs.get("dataset", "")), made_from(f), shape)


def default_recipe(dataset: str, made: Mapping | None, shape: tuple[int, int, int]) -> dict:
    """The recipe of a file that does not store one: MNIST's for grey square images of a data set
    known by name and prepared from its IDX files (MNIST, Fashion-MNIST), else converting and resizing."""
    H, W, C = shape
    if dataset in DATASETS and (made or {}).get("kind", "idx") == "idx" and C == 1 and H == W:
        return {"kind": "mnist", "size": [H, W]}
    return {"kind": "resize", "size": [H, W], "color": COLOR_OF_CHANNELS.get(C)}


COLOR_OF_CHANNELS = {1: "grey", 3: "rgb"}


def _recipe_ok(recipe, shape: tuple[int, int, int]) -> bool:
    """Whether a ``preprocess`` read from a file is as `recipe_of` documents, for images of shape (H, W, C)."""
    H, W, C = shape
    if not isinstance(recipe, dict) or recipe.get("size") != [H, W]:
        return False
    if recipe.get("kind") == "mnist":
        return C == 1 and H == W
    return recipe.get("kind") == "resize" and recipe.get("color") == COLOR_OF_CHANNELS.get(C)


def recipe_text(recipe: Mapping) -> str:
    """A recipe in words, for `info`."""
    H, W = recipe["size"]
    if recipe["kind"] == "mnist":
        return f"MNIST-style: a digit cropped, scaled and centred in {H}x{W}, grey"
    color = {"grey": "grey", "rgb": "RGB"}.get(str(recipe.get("color")), "arrays only (no image files)")
    return f"converted to {color} and resized to {H}x{W}"


def _what_is(path: Path) -> tuple[dict | None, str]:
    """(made_from of the data file at `path`, what it holds in words), or (None, what it is instead)."""
    try:
        f = h5py.File(path, "r", locking=False)
    except OSError:
        return None, "is not an HDF5 file" if path.exists() else "is a link to nothing"
    with f:
        try:
            a = f.attrs
            if str(a.get("format", "")) == "dpcnn-checkpoint":
                return None, "is a dpcnn checkpoint, not a data file"
            if "format_version" not in a or "dataset" not in a:
                return None, "is an HDF5 file but not a dpcnn data file"
            made, name = made_from(f), a["dataset"]
        except (OSError, KeyError, TypeError, ValueError):
            return None, "is an HDF5 file whose attributes cannot be read"
        if made["kind"] == "folder":
            return made, f"holds {name}, prepared from an image folder"
        if made["kind"] == "arrays":
            return made, f"holds {name}, written by dpcnn.fit from arrays"
        if made["kind"] == "unknown":
            return made, f"holds data named {name} that prepare did not make from its IDX files"
        return made, f"holds {name}, prepared from its IDX files"


def check_replaceable(out: Path, made: dict, flag: str = "--out") -> None:
    """DataError unless the prepared file about to be made as `made` (see `made_from`) may be
    written at `out`: nothing is there, or a data file made the same way (from the IDX files of
    the same data set, or from an image folder). Anything else (a checkpoint, another HDF5 file,
    any other file, data of another kind) is never replaced; the message says what it is, and for
    a data file the command that prepares it again."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    have, what = _what_is(out)
    if have is not None and have["kind"] == made["kind"] and (
            made["kind"] == "folder" or have.get("dataset") == made.get("dataset")):
        return
    new = f"the images of {made.get('folder')}" if made["kind"] == "folder" else made.get("dataset")
    again = "" if have is None else f"; it is prepared again with: {remake_command(out, have)}"
    raise DataError(f"{flag} {out}: {what}; not replaced by {new} (give another {flag}, or move it "
                    f"away first){again}")


# ----------------------------------------------------------------------------- writing

def pixel_stats(images: np.ndarray) -> tuple[float, float]:
    """Exact mean and standard deviation of images / 255, via a histogram of the 256 values.

    images: uint8 of any shape, e.g. (N, H, W) -> (mean, std) as Python floats (float64).
    """
    # bincount widens its input to int64: in blocks of 4 Mi values that is 32 MB, not 8 bytes a pixel
    flat, counts = images.reshape(-1), np.zeros(256, np.float64)
    for i in range(0, flat.size, 1 << 22):
        counts += np.bincount(flat[i:i + (1 << 22)], minlength=256)
    v = np.arange(256) / 255.0
    mean = counts @ v / counts.sum()
    var = counts @ (v - mean) ** 2 / counts.sum()
    return float(mean), float(np.sqrt(var))


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """`pixel_stats` of each channel: images (N, H, W) (one channel) or (N, H, W, C) uint8 ->
    (C means, C standard deviations). For grey images the one channel's are `pixel_stats`'s."""
    x = images if images.ndim == 4 else images[..., None]
    stats = [pixel_stats(x[..., c]) for c in range(x.shape[3])]
    return [m for m, _ in stats], [s for _, s in stats]


def check_pair(images: np.ndarray, labels: np.ndarray, num_classes: int, names: tuple[str, str]) -> None:
    """Images (N, H, W) or (N, H, W, C) uint8 and labels (N,) uint8 < num_classes, else DataError
    naming the images or the labels by `names`."""
    img, lab = names
    if images.ndim not in (3, 4) or images.dtype != np.uint8:
        raise DataError(f"{img}: expected (N, H, W) uint8 images, got {images.shape} {images.dtype}")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DataError(f"{lab}: expected (N,) uint8 labels, got {labels.shape} {labels.dtype}")
    if len(images) != len(labels):
        raise DataError(f"{lab}: {len(labels)} labels for {len(images)} images in {img}")
    if len(labels) and labels.max() >= num_classes:
        raise DataError(f"{lab}: label {labels.max()} out of range 0..{num_classes - 1}")


def test_holdout(n: int, fraction: float, seed: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """The rows of n kept for training and those held out for testing (a seeded `fraction`, at least
    one), each sorted; DataError naming `where` when n is too small to keep any for training."""
    order = np.random.default_rng(seed).permutation(n)
    k = max(1, round(fraction * n))
    if k >= n:
        raise DataError(f"{where}: {n} images are too few to hold out a test split")
    return np.sort(order[k:]), np.sort(order[:k])


def check_writable(out: Path, flag: str = "--out") -> None:
    """WriteError unless `out` could be created: its nearest existing ancestor is a writable
    directory (checked without creating anything)."""
    d = out.absolute().parent
    while not d.exists():
        d = d.parent
    if not d.is_dir() or not os.access(d, os.W_OK | os.X_OK):
        raise WriteError(f"{flag} {out}: cannot write there ({d} is not a writable directory)")


def write_h5(out: Path, info: DatasetInfo, arrays: Mapping[str, tuple[np.ndarray, np.ndarray]],
             sha: Mapping[str, str], made: Mapping | None = None, recipe: Mapping | None = None) -> None:
    """Write the prepared file atomically (write_h5_atomic), chunked by rows, with a Fletcher-32
    checksum on every chunk so that a damaged file is detected when read, and the SHA-256 of
    each array as its ``sha256`` attribute, which `verify` checks.

    arrays: split -> (images (N, H, W) or (N, H, W, C) uint8, labels (N,) uint8). sha: file name ->
    SHA-256. made: what the file is made from, stored as the ``made_from`` attribute (see
    `made_from`). recipe: how an image became a row, the ``preprocess`` attribute (see `recipe_of`;
    default: `default_recipe`).
    """
    too_few = _too_few_classes(info.class_names)
    if too_few:
        raise DataError(f"{info.name}: {too_few}")
    x_train = arrays["train"][0]
    mean, std = pixel_stats(x_train)
    channel_mean, channel_std = channel_stats(x_train)
    shape = (*x_train.shape[1:3], x_train.shape[3] if x_train.ndim == 4 else 1)
    recipe = dict(recipe) if recipe is not None else default_recipe(info.name, made, shape)

    def fill(f: h5py.File) -> None:
        f.attrs.update(dataset=info.name, class_names=json.dumps(list(info.class_names)),
                       format_version=FORMAT_VERSION, source_sha256=json.dumps(dict(sha)),
                       mean=mean, std=std, channel_mean=np.array(channel_mean), channel_std=np.array(channel_std),
                       preprocess=json.dumps(recipe), dpcnn_version=__version__)
        if made is not None:
            f.attrs["made_from"] = json.dumps(dict(made))
        for split, (x, y) in arrays.items():
            g = f.create_group(split)
            g.create_dataset("images", data=x, chunks=(min(ROW_CHUNK, max(len(x), 1)), *x.shape[1:]),
                             fletcher32=True).attrs["sha256"] = array_sha256(x)
            g.create_dataset("labels", data=y, chunks=(min(ROW_CHUNK * 16, max(len(y), 1)),),
                             fletcher32=True).attrs["sha256"] = array_sha256(y)

    out.parent.mkdir(parents=True, exist_ok=True)
    write_h5_atomic(out, fill)

