"""Classify images or arrays with a trained checkpoint.

    python -m dpcnn.predict --checkpoint runs/latest/best.h5 seven.png photo.jpg digits.npy

Image files (PNG, JPEG, anything Pillow reads; any size, colour or grey, dark ink on
light paper or light on dark) are made into 28x28 inputs the way MNIST was made:

1. grey levels (a transparent background counts as white paper);
2. if the border is light (mean border pixel > 127) the image is inverted, so the digit
   is white on black; the background level (median border pixel) is subtracted and the
   contrast stretched so the brightest ink is 255;
3. cropped to the bounding box of the ink (pixels above 20% of full intensity);
4. scaled (Lanczos, antialiased) so its longer side is 20 pixels, keeping the aspect ratio;
5. pasted into a black 28x28 field so that its centre of mass lands on pixel (14, 14).

``.npy`` arrays are taken as already in MNIST form (white digit on black, centred, 28x28)
and are not processed: shape (28, 28), (N, 28, 28) or (N, 28, 28, 1); an integer dtype
means pixel values 0-255, a float dtype means intensities in [0, 1] (that is, x / 255). They
are checked as ``dpcnn.load(...).predict`` checks its arrays (``dpcnn.inputs.check_images``).

That is ``--preprocess mnist``, the default (``auto``) for models trained on MNIST or
Fashion-MNIST. A model trained on other data (``prepare --from-folder``, any size, grey or RGB)
gets ``resize``: image files made as --from-folder made its training images, converted to grey
or RGB as the model takes and resized to its H x W (Lanczos). Its ``.npy`` arrays are
(H, W[, C]) or (N, H, W[, C]).

Both are then standardised like the training data, ``(x/255 - mean) / std``, with the
mean and std of the data file (``--data``, default the file the checkpoint was trained
on). If that recorded file is missing and the checkpoint was trained on MNIST, the
MNIST values are used.

Each input prints one line, ``path: 7 (p=0.993)`` (``path[i]`` for the i-th image of an
array); with ``--top K`` the next classes follow when they are at least 1% likely, and an
answer below 50% is flagged ``[low confidence: ...]`` (``low_confidence`` in ``--json``).
A file that cannot be read prints a one-line error naming it; the other files are still
classified, and the exit status is then 1.

Exit status: 0 all classified, 1 some input or the checkpoint failed, 2 bad command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from .checkpoint import load_model
from .cli import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    Parser,
    add_common_flags,
    entry_point,
    positive_int,
    report_error,
    setup_logging,
)
from .datasets import DATASETS
from .images import PIL_MISSING, eight_bit, folder_image, open_image
from .inputs import InputError, Normalisation, model_input, normalisation
from .layers import softmax

log = logging.getLogger("dpcnn")

BORDER_LIGHT = 127      # mean border grey level above which the image is dark ink on light paper
INK = 0.2               # after stretching, pixels above this fraction of 255 are ink (bounding box)
BOX = 20                # MNIST digits fit a 20x20 box in the 28x28 field

EPILOG = """\
examples:
  python -m dpcnn.predict --checkpoint runs/latest/best.h5 digit.png
  python -m dpcnn.predict --checkpoint runs/latest/best.h5 --top 3 scans/*.jpg
  python -m dpcnn.predict --checkpoint runs/latest/best.h5 batch.npy --json
  python -m dpcnn.predict --checkpoint runs/latest/best.h5 --save-input /tmp/seen photo.jpg
  dpcnn-predict --checkpoint runs/latest/best.h5 digit.png   the same, as a console script

  python -m dpcnn.predict --checkpoint runs/photos/best.h5 cat.jpg     a model of your own images
  python -m dpcnn.predict --checkpoint runs/digits/best.h5 --preprocess mnist scan.png

.npy arrays are used as they are: (H,W) or (N,H,W) grey, (N,H,W,C); for MNIST white digits on
black, centred; integer dtype = pixel values 0-255, float dtype = intensities in [0,1].
Images need Pillow: pip install "dpcnn[predict]".
Bad files are reported one line each and skipped; the exit status is then 1.
"""


# ----------------------------------------------------------------------------- preprocessing


def _pil():
    try:
        from PIL import Image, ImageOps
    except ImportError:
        return None, None
    return Image, ImageOps


def grey_levels(img) -> np.ndarray:
    """A Pillow image -> (H, W) float64 grey levels 0..255; transparency becomes white paper."""
    Image, ImageOps = _pil()
    img = eight_bit(ImageOps.exif_transpose(img))      # photos: honour the camera's rotation; 16-bit scans
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(paper, rgba)
    return np.asarray(img.convert("L"), dtype=np.float64)


def mnist_style(grey: np.ndarray, size: int = 28, name: str = "image") -> np.ndarray:
    """Grey levels (H, W) 0..255, any size and polarity -> (size, size) uint8, MNIST-style.

    White digit on black, the ink's longer side scaled to 20/28 of size, centre of mass
    at pixel (size/2, size/2). InputError (naming `name`) when there is no ink.
    """
    Image, _ = _pil()
    if Image is None:
        raise InputError(f"{name}: {PIL_MISSING}")
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
    small = Image.fromarray(np.rint(a).astype(np.uint8), "L").resize((w2, h2), Image.LANCZOS)
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


def read_image(path: Path, size: int = 28) -> np.ndarray:
    """An image file -> (size, size) uint8 MNIST-style; a one-line error naming the file if unusable."""
    return mnist_style(open_image(path, path, grey_levels), size, str(path))


def read_resized(path: Path, shape: tuple[int, int, int]) -> np.ndarray:
    """An image file -> (H, W) grey or (H, W, 3) RGB uint8 for a model of input shape (H, W, C),
    made as ``prepare --from-folder`` made its training images."""
    H, W, C = shape
    if C not in (1, 3):
        raise InputError(f"{path}: the model takes {C}-channel inputs, which image files do not hold; "
                         f"give a .npy array (N, {H}, {W}, {C})")
    return open_image(path, path, lambda img: folder_image(img, (H, W), "grey" if C == 1 else "rgb"))


def read_npy(path: Path) -> np.ndarray:
    """The array of a .npy file, as it is (dpcnn.inputs.check_images checks it); InputError if unreadable."""
    try:
        a = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, ValueError, EOFError) as e:
        raise InputError(f"{path}: not a readable .npy array ({' '.join(str(e).split())})") from None
    if not isinstance(a, np.ndarray):
        raise InputError(f"{path}: holds several arrays (.npz); give one .npy array")
    return a


# ----------------------------------------------------------------------------- the command


def load_inputs(path: Path, shape: tuple[int, int, int], digits: bool, norm: Normalisation
                ) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    """One input file for a model of input shape (H, W, C) -> (labels, the model's input (N, H, W, C)
    checked and standardised, the preprocessed uint8 image or None); digits: image files are made
    MNIST-style."""
    if path.suffix.lower() == ".npy":
        x, single = model_input(read_npy(path), shape, norm, name=str(path))
        return [str(path)] if single else [f"{path}[{i}]" for i in range(len(x))], x, None
    u8 = read_image(path, shape[0]) if digits else read_resized(path, shape)
    return [str(path)], model_input(u8, shape, norm, name=str(path))[0], u8


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m dpcnn.predict", description=__doc__.split("\n\n")[0],
               epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE",
                   help="image files (PNG, JPEG, ...) or .npy arrays")
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint file (e.g. runs/latest/best.h5)")
    p.add_argument("--data", type=Path, help="prepared data file for the pixel mean/std and class names "
                                             "(default: the one the checkpoint was trained on)")
    p.add_argument("--top", type=positive_int, default=1, metavar="K",
                   help="print up to the K most probable classes, those at least 1%% likely (default 1)")
    p.add_argument("--preprocess", choices=("auto", "mnist", "resize"), default="auto",
                   help="how image files become inputs: mnist (a digit cropped, scaled and centred as MNIST's "
                        "were), resize (converted and resized, as prepare --from-folder does); default auto: "
                        "mnist for models trained on MNIST or Fashion-MNIST, else resize")
    p.add_argument("--json", action="store_true", help="print one JSON object with every prediction")
    p.add_argument("--save-input", type=Path, metavar="DIR",
                   help="also write each image's preprocessed version (HxW) to DIR as PNG (what the model sees)")
    p.add_argument("--force", action="store_true", help="use --data even if the checkpoint was trained on "
                                                        "another data set")
    add_common_flags(p)
    return p


def _unique_stem(path: Path, inputs: list[Path]) -> str:
    """The file's stem, or its whole path as one name when another input has the same stem."""
    if sum(p.stem == path.stem for p in inputs) == 1:
        return path.stem
    return str(path).replace("/", "_").replace("\\", "_").lstrip("_")


SHOWN = 0.01        # --top lists further classes only from this probability on
UNSURE = 0.5        # below this, the answer is flagged as low confidence


def _fmt(name: str, p: float) -> str:
    return f"{name} (p={p:.3f})"


def describe(top: list[dict]) -> str:
    """'7 (p=0.993)', further classes only when they are at least SHOWN likely, and a flag when unsure."""
    shown = [top[0]] + [t for t in top[1:] if t["probability"] >= SHOWN]
    text = ", ".join(_fmt(t["name"], t["probability"]) for t in shown)
    return text + ("  [low confidence: not much like any class]" if top[0]["probability"] < UNSURE else "")


@entry_point
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.quiet)

    try:
        model, state = load_model(args.checkpoint)
        norm = normalisation(state, args.checkpoint, model, args.data, args.force)
        H, W, C = shape = model.spec.input_shape
        known = state.config.get("dataset") in DATASETS          # MNIST, Fashion-MNIST: made as MNIST was
        style = args.preprocess if args.preprocess != "auto" else "mnist" if known and C == 1 else "resize"
        if style == "mnist" and (C != 1 or H != W):
            raise InputError(f"--preprocess mnist: the model of {args.checkpoint} takes {H}x{W}x{C} inputs; "
                             "MNIST-style images are square and grey (use --preprocess resize)")
        digits = style == "mnist"
        if args.save_input:
            args.save_input.mkdir(parents=True, exist_ok=True)
    except (Exception, KeyboardInterrupt) as e:
        report_error(e, args.debug)
        return EXIT_ERROR

    k = min(args.top, model.spec.classes)
    names = norm.class_names
    results, errors = [], []
    for path in args.images:
        try:
            labels, x, u8 = load_inputs(path, shape, digits, norm)
            if u8 is not None and args.save_input:
                from PIL import Image
                Image.fromarray(u8, "L" if u8.ndim == 2 else "RGB").save(
                    args.save_input / f"{_unique_stem(path, args.images)}.{H}x{W}.png")
            probs = softmax(model.predict_logits(x).astype(np.float64))
        except KeyboardInterrupt as e:
            report_error(e, args.debug)
            return EXIT_INTERRUPTED
        except Exception as e:
            prefix = "" if str(path) in str(e) else f"{path}: "      # every line names its file
            errors.append({"input": str(path), "error": report_error(e, args.debug, prefix=prefix)})
            continue
        for label, pr in zip(labels, probs):
            top = np.argsort(-pr, kind="stable")[:k]
            rec = {"input": label, "class": int(top[0]), "name": names[top[0]], "probability": float(pr[top[0]]),
                   "low_confidence": bool(pr[top[0]] < UNSURE),
                   "top": [{"class": int(c), "name": names[c], "probability": float(pr[c])} for c in top]}
            results.append(rec)
            if not args.json:
                print(f"{label}: {describe(rec['top'])}", flush=True)
    if args.json:
        print(json.dumps({"checkpoint": str(args.checkpoint), "step": state.step, "normalisation": norm.source,
                          "predictions": results, "errors": errors}))
    return EXIT_ERROR if errors else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
