"""Classify images or arrays with a trained checkpoint.

    python -m dpcnn.predict --checkpoint runs/latest/best.h5 seven.png photo.jpg digits.npy

Image files (PNG, JPEG, anything Pillow reads; any size, colour or grey) are prepared as the
model's training images were, from what the checkpoint stores (the recipe of its data file,
``dpcnn.h5format.recipe_of``): the same path as ``dpcnn.load(...).predict`` (``dpcnn.inputs``).

- ``--preprocess resize`` (the default for models trained on anything but MNIST and
  Fashion-MNIST, e.g. on ``prepare --from-folder`` or ``dpcnn.fit`` files): upright as the EXIF
  says, converted to grey or RGB as the model takes, and resized to its H x W (Lanczos), as
  ``prepare --from-folder`` made its training images;
- ``--preprocess mnist`` (the default for MNIST and Fashion-MNIST models): made into 28x28 inputs
  the way MNIST was made (``dpcnn.images.mnist_style``): grey levels (a transparent background
  counts as white paper), inverted when the border is light, so the digit is white on black; the
  background subtracted and the contrast stretched; cropped to the ink; scaled so its longer side
  is 20 pixels; centred by its centre of mass in a black 28x28 field.

``.npy`` arrays are taken as already prepared (for MNIST: white digit on black, centred, 28x28)
and not processed: shape (H, W), (N, H, W), (H, W, C) or (N, H, W, C) of the model's input; an
integer dtype means pixel values 0-255, a float dtype intensities in [0, 1] (that is, x / 255).
They are checked as ``dpcnn.load(...).predict`` checks arrays of that shape
(``dpcnn.inputs.check_images``). (From Python, arrays of other sizes are original images, prepared
like image files.)

Both are then standardised like the training data, ``(x/255 - mean) / std`` per channel, with the
mean and std the checkpoint stores (``--data FILE``: those of that data file instead). A checkpoint
of an older dpcnn, which stores none, uses the data file it was trained on, or MNIST's values when
that file is gone and it was trained on MNIST.

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

from .api import load
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
from .images import mnist_style  # noqa: F401  (re-exported: tests/test_tools.py reads it as predict.mnist_style)
from .inputs import STYLES, InputError

log = logging.getLogger("dpcnn")

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


# ----------------------------------------------------------------------------- inputs


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


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m dpcnn.predict", description=__doc__.split("\n\n")[0],
               epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE",
                   help="image files (PNG, JPEG, ...) or .npy arrays")
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint file (e.g. runs/latest/best.h5)")
    p.add_argument("--data", type=Path, help="prepared data file whose pixel mean/std, class names and recipe to "
                                             "use (default: those the checkpoint stores)")
    p.add_argument("--top", type=positive_int, default=1, metavar="K",
                   help="print up to the K most probable classes, those at least 1%% likely (default 1)")
    p.add_argument("--preprocess", choices=STYLES, default="auto",
                   help="how image files become inputs: mnist (a digit cropped, scaled and centred as MNIST's "
                        "were), resize (converted and resized, as prepare --from-folder does); default auto: "
                        "as the model's training images were made (the checkpoint says: mnist for models "
                        "trained on MNIST or Fashion-MNIST, else resize)")
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
        clf = load(args.checkpoint, args.data, args.force, args.preprocess)
        H, W, C = clf.spec.input_shape
        if args.save_input:
            args.save_input.mkdir(parents=True, exist_ok=True)
    except (Exception, KeyboardInterrupt) as e:
        report_error(e, args.debug)
        return EXIT_ERROR

    k = min(args.top, clf.spec.classes)
    names = clf.class_names
    results, errors = [], []
    for path in args.images:
        try:
            if path.suffix.lower() == ".npy":                  # already prepared: as dpcnn.load(...).predict checks
                x, single = clf.prep(read_npy(path), str(path), originals=False)
                labels = [str(path)] if single else [f"{path}[{i}]" for i in range(len(x))]
            else:                                               # prepared as the training images were
                u8 = clf.prep.original(path, str(path))
                x, labels = clf.prep.standardise(u8[None], 255.0), [str(path)]
                if args.save_input:
                    from PIL import Image
                    Image.fromarray(u8[..., 0] if C == 1 else u8).save(
                        args.save_input / f"{_unique_stem(path, args.images)}.{H}x{W}.png")
            probs = clf.probabilities(x)
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
        print(json.dumps({"checkpoint": str(args.checkpoint), "step": clf.state.step, "normalisation": clf.norm.source,
                          "predictions": results, "errors": errors}))
    return EXIT_ERROR if errors else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
