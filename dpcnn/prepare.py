"""The data command: ``python -m dpcnn.data prepare|info`` (also ``dpcnn-prepare``).

    python -m dpcnn.data prepare                        # MNIST from the public mirrors
    python -m dpcnn.data prepare --dataset fashion-mnist
    python -m dpcnn.data prepare --source ~/datasets/mnist       # four files, .gz or raw
    python -m dpcnn.data prepare --from-folder photos/ --out data/photos.h5    # their own size and colour
    python -m dpcnn.data info                           # data/mnist.h5: summary, and verified?

The work is done elsewhere, one job a module: ``dpcnn.datasets`` (the data sets known by name),
``dpcnn.idx`` (IDX files: verify, download, prepare), ``dpcnn.images`` (image folders) and
``dpcnn.h5format`` (the file written, and read back by ``info``). No MPI is needed: run it on a
cluster's login node.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    Parser,
    UserError,
    add_common_flags,
    entry_point,
    open_unit_interval,
    positive_float,
    report_error,
    setup_logging,
)
from .datasets import DATASETS
from .downloads import MIN_BYTES, TIMEOUT_S
from .h5format import DataError, default_data_path, info_lines, verify
from .idx import DownloadError, offline_message, prepare_dataset
from .images import COLORS, prepare_folder

EPILOG = """\
examples:
  python -m dpcnn.data prepare                         MNIST from the public mirrors
  python -m dpcnn.data prepare --dataset fashion-mnist
  python -m dpcnn.data prepare --source ~/datasets/mnist
  python -m dpcnn.data prepare --source https://example.org/mnist/ --out /scratch/mnist.h5
  python -m dpcnn.data info                            data/mnist.h5: attributes, counts, verified
  python -m dpcnn.data prepare --from-folder photos/ --out data/photos.h5
                                                       your images: photos/<class>/*.png|jpg, their
                                                       own size and colour
  python -m dpcnn.data prepare --from-folder photos/ --size 32x32 --color grey --out data/small.h5
  dpcnn-prepare --dataset mnist                        the same, as a console script

Preparing needs only numpy and h5py (no MPI), so it runs on a cluster's login node:
  pip install numpy h5py tqdm && python -m dpcnn.data prepare
"""


def _size(s: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 28x28, got {s!r}") from None
    if not (4 <= h <= 1024 and 4 <= w <= 1024):
        raise argparse.ArgumentTypeError(f"expected sizes from 4 to 1024, got {s!r}")
    return h, w


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m dpcnn.data", epilog=EPILOG,
               formatter_class=argparse.RawDescriptionHelpFormatter,
               description="Prepare MNIST-style data sets as verified HDF5 files.")
    sub = p.add_subparsers(dest="command", required=True)
    common = Parser(add_help=False)
    add_common_flags(common)
    pp = sub.add_parser("prepare", parents=[common], epilog=EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        help="download or read, verify, and write data/<dataset>.h5")
    pp.add_argument("--dataset", default="mnist", choices=sorted(DATASETS))
    pp.add_argument("--from-folder", type=Path, metavar="DIR",
                    help="your own images instead: DIR holds one subfolder of images per class (PNG, JPEG, ...)")
    pp.add_argument("--test-folder", type=Path, metavar="DIR", help="with --from-folder: the test images, the "
                    "same subfolders (default: hold out --test-fraction of DIR)")
    pp.add_argument("--test-fraction", type=open_unit_interval, default=0.1,
                    help="with --from-folder and no --test-folder: the seeded share held out for testing (0.1)")
    pp.add_argument("--size", type=_size, metavar="HxW",
                    help="with --from-folder: resize every image to H x W pixels (default: the images' own size "
                         "when they share one, else their most common size, said in one line)")
    pp.add_argument("--color", choices=sorted(COLORS),
                    help="with --from-folder: grey (1 channel) or rgb (3 channels); default: the images' own, "
                         "grey only when every image is grey")
    pp.add_argument("--source", help="directory with the four IDX files (.gz or raw), or an "
                                     "http(s) base URL; default: the public mirrors in order")
    pp.add_argument("--out", type=Path, help="output file (default: data/<dataset>.h5)")
    pp.add_argument("--force", action="store_true", help="rewrite even if up to date (never a file of another "
                                                         "data set or kind: a checkpoint, a --from-folder file)")
    pp.add_argument("--timeout", type=positive_float, default=TIMEOUT_S,
                    help=f"a download fails when it delivers less than {MIN_BYTES // 1024} KiB in this many "
                         f"seconds (a stalled or trickling server); default {TIMEOUT_S:g}")
    pi = sub.add_parser("info", parents=[common],
                        help="print a prepared file's attributes and counts, and verify its arrays")
    pi.add_argument("path", type=Path, nargs="?", help="prepared file (default: data/<dataset>.h5)")
    pi.add_argument("--dataset", default="mnist", choices=sorted(DATASETS))
    return p


def _info(path: Path) -> None:
    """`info`: the file's summary, then whether its arrays verify (a failure raises, after the summary)."""
    print("\n".join(info_lines(path)), flush=True)
    try:
        ok = verify(path)
    except DataError:
        print("verified       FAILED (see the error)", flush=True)
        raise
    print("verified       yes: every array matches its SHA-256" if ok else
          "verified       no: not verified, the file stores no SHA-256 of its arrays; prepare it again "
          "to add them (the command 'made by' above)")


def _offline_message(args, offline: bool) -> str:
    cmd = "python -m dpcnn.data prepare"
    if args.dataset != "mnist":
        cmd += f" --dataset {args.dataset}"
    cmd += " --source DIR" + (f" --out {args.out}" if args.out else "")
    return offline_message(args.dataset, offline, cmd)


@entry_point
def main(argv=None) -> int:
    """`python -m dpcnn.data prepare|info ...`; also the `dpcnn-prepare` script (no verb)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("prepare", "info", "-h", "--help"):
        argv.insert(0, "prepare")
    args = _parser().parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    try:
        if args.command == "info":
            _info(args.path or default_data_path(args.dataset))
        elif args.from_folder is not None:
            out = args.out or default_data_path(args.from_folder.resolve().name)
            prepare_folder(args.from_folder, out, test=args.test_folder, test_fraction=args.test_fraction,
                           size=args.size, color=args.color)
        else:
            prepare_dataset(args.dataset, args.source, args.out, force=args.force, timeout=args.timeout)
        return EXIT_OK
    except KeyboardInterrupt as e:
        report_error(e, args.debug)
        return EXIT_INTERRUPTED
    except DownloadError as e:
        if args.debug:
            report_error(e, True)
        report_error(UserError(_offline_message(args, e.offline)))
        return EXIT_ERROR
    except Exception as e:
        report_error(e, args.debug)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
