"""Image files as arrays: reading them as --from-folder stores them, and preparing an image folder.

    x, y, classes, digest = read_folder(Path("photos"))               # their own size and colour
    prepare_folder("photos", "data/photos.h5")                        # ... as a prepared file
    prepare_folder("photos", "data/photos.h5", size=(32, 32), color="rgb")

An image folder holds one subfolder of images per class (the layout torchvision's ImageFolder and
Keras's image_dataset_from_directory read). The images keep what they are: their colour (grey
only when every image is grey), and their size when they all share one (resized to ``--size``
when given, or to their most common size when sizes differ, said in one info line). Every image is
turned upright as its EXIF orientation says, 16-bit grey scaled to 8 bits, converted to grey or
RGB and resized (Lanczos) when its size differs: ``folder_image``, which a model trained on such a
file also applies to new images (``dpcnn.inputs``). ``mnist_style`` makes an image of a digit
the way MNIST's were made, for models trained on MNIST. All open image files with ``open_image``,
which refuses an image of more pixels than ``pixel_limit()`` before decoding it. Pillow is needed
(the ``predict`` extra) and imported only when an image is read.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .cli import UserError
from .datasets import DatasetInfo
from .h5format import DataError, check_pair, check_replaceable, check_writable, test_holdout, write_h5

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
COLORS = {"grey": "L", "rgb": "RGB"}
GREY_MODES = ("1", "L", "LA", "I", "F")   # Pillow modes without colour (and I;16*)
LARGE_SIDE = 256                          # a kept size above this on a side makes a slow, large model: warned
BORDER_LIGHT = 127      # mnist_style: mean border grey level above which the image is dark ink on light paper
INK = 0.2               # after stretching, pixels above this fraction of 255 are ink (bounding box)
BOX = 20                # MNIST digits fit a 20x20 box in the 28x28 field
PIL_MISSING = 'reading images needs Pillow: pip install "dpcnn[predict]" (or pip install pillow)'


class InputError(UserError):
    """Images a model cannot be given (one-line message naming them)."""


def shown(path) -> str:
    """A path as text that can always be printed: bytes of a name that are not UTF-8 as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def pixel_limit() -> int | None:
    """The most pixels an image file may have: Pillow's MAX_IMAGE_PIXELS (89,478,485 unless a program
    changes it; None: no limit). Pillow itself only warns above it and refuses at twice that."""
    from PIL import Image

    return Image.MAX_IMAGE_PIXELS


def open_image(source, name, convert: Callable[[Any], Any], load: bool = True):
    """convert(the Pillow image in `source`, a path or a binary file), loaded (decoded) only when it
    has no more pixels than pixel_limit(), and not at all when not `load` (convert then sees the
    header: size, mode, EXIF). DataError naming `name` when it has more, or is missing or
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
                if load:
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
    """A Pillow image -> (H, W) grey or (H, W, 3) RGB uint8 of size = (H, W), upright as its EXIF
    orientation says, 16-bit grey scaled to 8 bits, resized (Lanczos) when its size differs: what
    --from-folder stores, and what a model trained on such a file is given."""
    from PIL import Image, ImageOps

    H, W = size
    im = eight_bit(ImageOps.exif_transpose(im)).convert(COLORS[color])
    if im.size != (W, H):
        im = im.resize((W, H), Image.Resampling.LANCZOS)
    return np.asarray(im, dtype=np.uint8)


def grey_levels(img) -> np.ndarray:
    """A Pillow image -> (H, W) float64 grey levels 0..255, upright, 16-bit scaled to 8 bits;
    transparency becomes white paper."""
    from PIL import Image, ImageOps

    img = eight_bit(ImageOps.exif_transpose(img))      # photos: honour the camera's rotation; 16-bit scans
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(paper, rgba)
    return np.asarray(img.convert("L"), dtype=np.float64)


def mnist_style(grey: np.ndarray, size: int = 28, name: str = "image") -> np.ndarray:
    """Grey levels (H, W) 0..255, any size and polarity -> (size, size) uint8, made as MNIST was:

    1. if the border is light (mean border pixel > 127) the image is inverted, so the digit is
       white on black; the background level (median border pixel) is subtracted and the contrast
       stretched so the brightest ink is 255;
    2. cropped to the bounding box of the ink (pixels above 20% of full intensity);
    3. scaled (Lanczos, antialiased) so its longer side is 20/28 of size, keeping the aspect ratio;
    4. pasted into a black field so that its centre of mass lands on pixel (size/2, size/2).

    InputError (naming `name`) when there is no ink, or Pillow is missing.
    """
    try:
        from PIL import Image
    except ImportError:
        raise InputError(f"{name}: {PIL_MISSING}") from None
    a = np.asarray(grey, dtype=np.float64)
    if a.ndim != 2 or min(a.shape) < 1:
        raise InputError(f"{name}: expected a 2-D grey image, got shape {a.shape}")
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    if border.mean() > BORDER_LIGHT:                   # dark ink on light paper: make it white on black
        a, border = 255.0 - a, 255.0 - border
    a = np.clip(a - np.median(border), 0, None)
    top = a.max()
    if top < 255 * 0.1:
        raise InputError(f"{name}: no digit found (the image is blank or has almost no contrast)")
    a *= 255.0 / top
    rows, cols = np.nonzero(a > 255 * INK)
    a = a[rows.min():rows.max() + 1, cols.min():cols.max() + 1]

    box = max(1, round(BOX * size / 28))
    h, w = a.shape
    s = box / max(h, w)
    h2, w2 = max(1, round(h * s)), max(1, round(w * s))
    small = Image.fromarray(np.rint(a).astype(np.uint8), "L").resize((w2, h2), Image.Resampling.LANCZOS)
    d = np.asarray(small, dtype=np.float64)
    if d.max() > 0:                                    # thin strokes fade when shrunk: restore full ink
        d *= 255.0 / d.max()

    m = d.sum()
    cy = (d.sum(axis=1) @ np.arange(h2)) / m
    cx = (d.sum(axis=0) @ np.arange(w2)) / m
    # place the centre of mass on (size/2, size/2), keeping the whole digit inside the field
    y0 = min(max(round(size / 2 - cy), 0), size - h2)
    x0 = min(max(round(size / 2 - cx), 0), size - w2)
    out = np.zeros((size, size), dtype=np.uint8)
    out[y0:y0 + h2, x0:x0 + w2] = np.rint(d).astype(np.uint8)
    return out


# ----------------------------------------------------------------------------- image folders


def folder_files(root: Path, classes: list[str] | None = None) -> tuple[list[str], list[list[Path]]]:
    """An image folder -> (its class names: the subfolders in sorted order, each class's image files
    in sorted order). `classes`: those a test folder must have (the training folder's)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory (expected one subfolder of images per class)")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes is not None and found != classes:
        raise DataError(f"{root}: classes {found} differ from the training folder's {classes}")
    if len(found) < 2 or len(found) > 256:
        raise DataError(f"{root}: {len(found)} class subfolder(s), expected 2 to 256")
    files = []
    for name in found:                                   # class names are stored as text: UTF-8
        _check_utf8(root / name, "its name is a class name")
        some = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not some:
            raise DataError(f"{root / name}: no images ({', '.join(IMAGE_SUFFIXES)})")
        files.append(some)
    return found, files


def _header(im) -> tuple[tuple[int, int], bool]:
    """An opened, not decoded Pillow image -> ((H, W) as it is seen upright, whether its mode holds
    no colour)."""
    w, h = im.size
    if im.getexif().get(0x0112) in (5, 6, 7, 8):       # EXIF orientations that turn it by 90 degrees
        w, h = h, w
    return (h, w), im.mode in GREY_MODES or im.mode.startswith("I;16")


def survey(files: list[Path]) -> tuple[Counter, bool]:
    """The image files' headers, not their pixels -> (how many there are of each size (H, W), seen
    upright; whether every one is stored without colour)."""
    sizes: Counter = Counter()
    grey = True
    for p in files:
        size, g = open_image(p, p, _header, load=False)
        sizes[size] += 1
        grey = grey and g
    return sizes, grey


def choose_size(sizes: Counter, where: str) -> tuple[int, int]:
    """The size images of these sizes are stored at when no --size is given: their own when they
    share one, else the most common (ties: the smaller), said in one info line."""
    (size, _), *others = sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0][0] * kv[0][1], kv[0]))
    if others:
        areas = sorted(sizes, key=lambda hw: hw[0] * hw[1])
        logger.info("%s: images of %d sizes (%s to %s): all resized to %s, the most common (%d of %d images); "
                    "--size HxW chooses another", where, len(sizes), _hw(areas[0]), _hw(areas[-1]), _hw(size),
                    sizes[size], sum(sizes.values()))
    if max(size) > LARGE_SIDE:
        logger.warning("warning: %s: images of %s make a large model input (slow to train, a large first dense "
                       "layer); --size HxW resizes them, e.g. --size 64x64", where, _hw(size))
    return size


def _hw(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def read_images(files: list[list[Path]], names: list[str], size: tuple[int, int], color: str
                ) -> tuple[np.ndarray, np.ndarray, str]:
    """Each class's image files -> (images (N, H, W) grey or (N, H, W, 3) RGB uint8 of size (H, W),
    labels (N,) uint8, SHA-256 over every file's class/name and bytes). One decode per file."""
    images, labels, h = [], [], hashlib.sha256()
    for label, (name, some) in enumerate(zip(names, files)):
        for p in some:                                    # not a hot path
            raw = p.read_bytes()
            h.update(os.fsencode(f"{name}/{p.name}") + f":{len(raw)}:".encode())
            h.update(raw)
            images.append(open_image(io.BytesIO(raw), p, lambda im: folder_image(im, size, color)))
            labels.append(label)
    return np.stack(images), np.asarray(labels, np.uint8), h.hexdigest()


def settle_colour(*sets: np.ndarray) -> tuple[list[np.ndarray], str]:
    """RGB image sets (N, H, W, 3) read without --color -> the same as grey (N, H, W) when every
    pixel of every image has R = G = B (grey pictures stored as RGB: Pillow's grey conversion
    gives exactly that value, so they equal what reading them as grey gives), else unchanged."""
    if all(np.array_equal(x[..., 0], x[..., 1]) and np.array_equal(x[..., 0], x[..., 2]) for x in sets):
        return [np.ascontiguousarray(x[..., 0]) for x in sets], "grey"
    return list(sets), "rgb"


def read_folder(root: Path, size: tuple[int, int] | None = None, color: str | None = None,
                classes: list[str] | None = None) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    """An image folder, one subfolder per class -> (images (N, H, W) grey or (N, H, W, 3) RGB uint8,
    labels (N,) uint8, class names, SHA-256 over every file's path and bytes).

    Classes are the subfolders in sorted order (or `classes`, for a test folder that must match);
    files are taken in sorted order. size (H, W) and color ("grey", "rgb") as given, else as the
    images are (see `prepare_folder`)."""
    names, files = folder_files(Path(root), classes)
    size, color, settle = _settle(files, size, color, str(root))
    x, y, digest = read_images(files, names, size, color)
    if settle:
        (x,), color = settle_colour(x)
    return x, y, names, digest


def _settle(files: list[list[Path]], size, color, where: str) -> tuple[tuple[int, int], str, bool]:
    """(the size, the colour to read the files in, whether to settle the colour after reading:
    read as RGB, stored as grey if every image is)."""
    if size is not None and color is not None:
        return size, color, False
    sizes, grey = survey([p for some in files for p in some])
    size = size or choose_size(sizes, where)
    if color is not None:
        return size, color, False
    return size, "grey" if grey else "rgb", not grey


def _check_utf8(path: Path, why: str) -> None:
    """DataError naming `path` when its name is not UTF-8 (it cannot be stored as text)."""
    try:
        path.name.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{shown(path)}: the folder's name is not UTF-8, and {why}, stored as text: "
                        "rename the folder") from None


def prepare_folder(root, out, *, test=None, test_fraction: float = 0.1, size: tuple[int, int] | None = None,
                   color: str | None = None, seed: int = 0, name: str | None = None) -> Path:
    """Write an image folder (and a test folder, or a seeded `test_fraction` of it) as a prepared file.

    The images keep their colour unless `color` ("grey" or "rgb") is given: grey only when every
    image, of both folders, is grey (stored without colour, or with R = G = B everywhere). They keep
    their size unless `size` (H, W) is given or the sizes differ: then every image is resized to the
    most common size (one info line says so). The data set is named after the folder unless `name`
    is given; its class names are the subfolders'. The file has the layout of every prepared file
    (see dpcnn.h5format), images (N, H, W) for grey and (N, H, W, 3) for RGB, and its recipe
    (``preprocess``: resize to H x W, the colour) lets a model trained on it prepare new images the
    same way. A file at `out` is replaced only when it was prepared from an image folder too.
    """
    root, out = Path(root), Path(out)
    if out.is_dir():
        raise DataError(f"--out {out}: is a directory; give a file name, e.g. {out / (root.name + '.h5')}")
    made = {"kind": "folder", "folder": str(root.absolute()),
            "test_folder": None if test is None else str(Path(test).absolute()),
            "test_fraction": None if test is not None else test_fraction,
            "size": None if size is None else list(size), "color": color}
    check_replaceable(out, made)
    check_writable(out)
    if name is None:
        _check_utf8(root.resolve(), "it names the data set")
    if test is None and not 0 < test_fraction < 1:
        raise DataError(f"--test-fraction {test_fraction}: expected a number between 0 and 1")
    classes, files = folder_files(root)
    test_files = folder_files(Path(test), classes)[1] if test is not None else []
    where = str(root) if test is None else f"{root} and {test}"
    size, color, settle = _settle(files + test_files, size, color, where)
    x, y, digest = read_images(files, classes, size, color)
    sha = {"train": digest}
    if test is not None:
        xt, yt, sha["test"] = read_images(test_files, classes, size, color)
    else:
        tr, te = test_holdout(len(y), test_fraction, seed, str(root))
        (x, y), (xt, yt) = (x[tr], y[tr]), (x[te], y[te])
        sha["test"] = f"{digest}:fraction={test_fraction}:seed={seed}"
    if settle:
        (x, xt), color = settle_colour(x, xt)
    made.update(size=list(size), color=color)                # what the file holds
    info = DatasetInfo(name=name or root.resolve().name, class_names=tuple(classes))
    for split, (a, b) in (("train", (x, y)), ("test", (xt, yt))):
        check_pair(a, b, len(classes), (f"{split} images", f"{split} labels"))
    write_h5(out, info, {"train": (x, y), "test": (xt, yt)}, sha, made,
             recipe={"kind": "resize", "size": list(size), "color": color})
    logger.info("wrote %s: %d train and %d test images of %s (%s) in %d classes", out, len(y), len(yt),
                _hw(size), "RGB" if color == "rgb" else "grey", len(classes))
    return out
