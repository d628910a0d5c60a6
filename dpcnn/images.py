"""Image files as arrays: reading them as --from-folder stores them, and preparing an image folder.

    x, y, classes, digest = read_folder(Path("photos"), size=(32, 32), color="rgb")
    prepare_folder("photos", "data/photos.h5", size=(32, 32), color="rgb")

An image folder holds one subfolder of images per class (the layout torchvision's ImageFolder and
Keras's image_dataset_from_directory read). Every image is turned upright as its EXIF orientation
says, 16-bit grey scaled to 8 bits, converted to grey or RGB and resized (Lanczos): ``folder_image``,
which ``dpcnn.predict`` also uses on a model trained on such a file. Both open image files with
``open_image``, which refuses an image of more pixels than ``pixel_limit()`` before decoding it.
Pillow is needed (the ``predict`` extra) and imported only when an image is read.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import DatasetInfo
from .h5format import DataError, check_pair, check_replaceable, check_writable, write_h5

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
COLORS = {"grey": "L", "rgb": "RGB"}
PIL_MISSING = 'reading images needs Pillow: pip install "dpcnn[predict]" (or pip install pillow)'


def shown(path) -> str:
    """A path as text that can always be printed: bytes of a name that are not UTF-8 as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def pixel_limit() -> int | None:
    """The most pixels an image file may have: Pillow's MAX_IMAGE_PIXELS (89,478,485 unless a program
    changes it; None: no limit). Pillow itself only warns above it and refuses at twice that."""
    from PIL import Image

    return Image.MAX_IMAGE_PIXELS


def open_image(source, name, convert: Callable[[Any], Any]):
    """convert(the Pillow image in `source`, a path or a binary file), loaded only when it has no
    more pixels than pixel_limit(). DataError naming `name` when it has more, or is missing or
    unreadable, or Pillow is not installed."""
    try:
        from PIL import Image
    except ImportError:
        raise DataError(f"{shown(name)}: {PIL_MISSING}") from None
    limit = pixel_limit()
    try:
        with warnings.catch_warnings():            # Pillow warns from the limit on: we refuse instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as img:         # reads the header, not the pixels
                w, h = img.size
                if limit is not None and w * h > limit:
                    raise DataError(f"{shown(name)}: {w}x{h} pixels, more than the {limit} an image may have "
                                    "(PIL.Image.MAX_IMAGE_PIXELS); scale it down first")
                img.load()
                return convert(img)
    except Image.DecompressionBombError as e:       # twice the limit: refused by Pillow on opening
        raise DataError(f"{shown(name)}: more pixels than the {limit} an image may have ({e})") from None
    except FileNotFoundError:
        raise DataError(f"{shown(name)}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{shown(name)}: is a directory, not an image") from None
    except Image.UnidentifiedImageError:
        raise DataError(f"{shown(name)}: not an image file Pillow can read") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt files
        raise DataError(f"{shown(name)}: cannot read the image ({' '.join(str(e).split())})") from None


def eight_bit(im):
    """A Pillow image with 8 bits a channel: 16-bit grey (modes I;16*, and I holding 0-65535)
    scaled down by 257, as Pillow's own convert("L") would clip it to white; others unchanged."""
    from PIL import Image

    if im.mode.startswith("I;16") or (im.mode == "I" and np.asarray(im).max(initial=0) > 255):
        a = np.asarray(im).astype(np.float64)
        return Image.fromarray(np.clip(np.rint(a / 257), 0, 255).astype(np.uint8), "L")
    return im


def folder_image(im, size: tuple[int, int], color: str = "grey") -> np.ndarray:
    """A Pillow image -> (H, W) grey or (H, W, 3) RGB uint8 resized to size = (H, W) (Lanczos),
    upright as its EXIF orientation says and 16-bit grey scaled to 8 bits: what --from-folder
    stores, and what predict feeds a model trained on such a file."""
    from PIL import Image, ImageOps

    H, W = size
    im = eight_bit(ImageOps.exif_transpose(im))
    return np.asarray(im.convert(COLORS[color]).resize((W, H), Image.Resampling.LANCZOS), dtype=np.uint8)


def read_folder(root: Path, size: tuple[int, int], color: str = "grey",
                classes: list[str] | None = None) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    """An image folder, one subfolder per class (the layout torchvision's ImageFolder and Keras's
    image_dataset_from_directory read) -> (images (N, H, W) grey or (N, H, W, 3) RGB uint8, labels
    (N,) uint8, class names, SHA-256 over every file's path and bytes).

    Classes are the subfolders in sorted order (or `classes`, for a test folder that must match);
    files are taken in sorted order, converted to grey or RGB and resized to size = (H, W).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory (expected one subfolder of images per class)")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes is not None and found != classes:
        raise DataError(f"{root}: classes {found} differ from the training folder's {classes}")
    if len(found) < 2 or len(found) > 256:
        raise DataError(f"{root}: {len(found)} class subfolder(s), expected 2 to 256")
    for name in found:                                   # class names are stored as text: UTF-8
        _check_utf8(root / name, "its name is a class name")
    H, W = size
    images, labels, h = [], [], hashlib.sha256()
    for label, name in enumerate(found):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"{root / name}: no images ({', '.join(IMAGE_SUFFIXES)})")
        for p in files:                                   # one decode per file: not a hot path
            raw = p.read_bytes()
            h.update(os.fsencode(f"{name}/{p.name}") + f":{len(raw)}:".encode())
            h.update(raw)
            images.append(open_image(io.BytesIO(raw), p, lambda im: folder_image(im, size, color)))
            labels.append(label)
    return np.stack(images), np.asarray(labels, np.uint8), found, h.hexdigest()


def _check_utf8(path: Path, why: str) -> None:
    """DataError naming `path` when its name is not UTF-8 (it cannot be stored as text)."""
    try:
        path.name.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{shown(path)}: the folder's name is not UTF-8, and {why}, stored as text: "
                        "rename the folder") from None


def prepare_folder(root, out, *, test=None, test_fraction: float = 0.1, size: tuple[int, int] = (28, 28),
                   color: str = "grey", seed: int = 0, name: str | None = None) -> Path:
    """Write an image folder (and a test folder, or a seeded `test_fraction` of it) as a prepared file.

    The data set is named after the folder unless `name` is given; its class names are the
    subfolders'. The file has the layout of every prepared file (see dpcnn.h5format), images
    (N, H, W) for grey and (N, H, W, 3) for RGB. A file at `out` is replaced only when it was
    prepared from an image folder too.
    """
    root, out = Path(root), Path(out)
    if out.is_dir():
        raise DataError(f"--out {out}: is a directory; give a file name, e.g. {out / (root.name + '.h5')}")
    made = {"kind": "folder", "folder": str(root.absolute()),
            "test_folder": None if test is None else str(Path(test).absolute()),
            "test_fraction": None if test is not None else test_fraction, "size": list(size), "color": color}
    check_replaceable(out, made)
    check_writable(out)
    if name is None:
        _check_utf8(root.resolve(), "it names the data set")
    x, y, classes, digest = read_folder(root, size, color)
    sha = {"train": digest}
    if test is not None:
        xt, yt, _, sha["test"] = read_folder(Path(test), size, color, classes)
    else:
        if not 0 < test_fraction < 1:
            raise DataError(f"--test-fraction {test_fraction}: expected a number between 0 and 1")
        order = np.random.default_rng(seed).permutation(len(y))
        k = max(1, round(test_fraction * len(y)))
        if k >= len(y):
            raise DataError(f"{root}: {len(y)} images are too few to hold out a test split")
        te, tr = np.sort(order[:k]), np.sort(order[k:])
        (x, y), (xt, yt) = (x[tr], y[tr]), (x[te], y[te])
        sha["test"] = f"{digest}:fraction={test_fraction}:seed={seed}"
    info = DatasetInfo(name=name or root.resolve().name, class_names=tuple(classes))
    for split, (a, b) in (("train", (x, y)), ("test", (xt, yt))):
        check_pair(a, b, len(classes), (f"{split} images", f"{split} labels"))
    write_h5(out, info, {"train": (x, y), "test": (xt, yt)}, sha, made)
    logger.info("wrote %s: %d train and %d test images of %s in %d classes", out, len(y), len(yt),
                "x".join(map(str, x.shape[1:])), len(classes))
    return out
