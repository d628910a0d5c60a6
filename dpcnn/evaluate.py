"""Evaluate a checkpoint on a prepared data set: accuracy, loss, per-class accuracy, confusion matrix.

    python -m dpcnn.evaluate --checkpoint runs/latest/best.h5
    python -m dpcnn.evaluate --checkpoint runs/latest/best.h5 --data data/mnist.h5 --json

One process, no MPI. The data file defaults to the one the checkpoint was trained on
(``config["data"]`` in the checkpoint). Images are standardised with that file's mean
and std, as in training. A checkpoint trained on another data set (its fingerprint
differs from the file's) is refused unless ``--force``.

Exit status: 0 done, 1 error, 2 bad command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .checkpoint import CheckpointError, check_data, load_model, recorded_data_path
from .cli import EXIT_ERROR, EXIT_OK, add_common_flags, entry_point, positive_int, report_error, setup_logging
from .data import Split
from .malloc import keep_freed_memory
from .metrics import evaluate
from .model import EVAL_BATCH

log = logging.getLogger("dpcnn")

EPILOG = """\
examples:
  python -m dpcnn.evaluate --checkpoint runs/latest/best.h5
  python -m dpcnn.evaluate --checkpoint runs/latest/ckpt-step000007496.h5 --data data/mnist.h5
  python -m dpcnn.evaluate --checkpoint runs/latest/best.h5 --json > eval.json
  python -m dpcnn.evaluate --checkpoint runs/latest/best.h5 --split train
  dpcnn-evaluate --checkpoint runs/latest/best.h5      the same, as a console script

--json prints one object: accuracy, loss, count, per_class_accuracy, confusion (rows: true
class, columns: predicted class), class_names, checkpoint, data, split, step.
exit status: 0 done, 1 error, 2 bad command line.
"""


# ----------------------------------------------------------------------------- evaluation


def run(checkpoint: Path, data: Path | None = None, split: str = "test", batch_size: int = EVAL_BATCH,
        force: bool = False) -> dict:
    """Evaluate a checkpoint on one split of a data file -> the result dict that --json prints."""
    checkpoint = Path(checkpoint)
    model, state = load_model(checkpoint)
    if data is None:
        data = recorded_data_path(state, checkpoint)
        if not data.is_file():
            raise CheckpointError(f"{data}: no such file (the data file recorded in {checkpoint}); "
                                  "pass --data")
    with Split(data, split) as s:
        check_data(state, checkpoint, s, model, force)
        log.info("evaluating %s (step %d) on %s, %s split, %d images", checkpoint, state.step, s.path, split, s.n)
        x, y = s.read(0, s.n)
        totals = evaluate(model, x, y, batch_size)
        names = list(s.class_names)
    return {**totals.summary(), "class_names": names, "checkpoint": str(checkpoint), "data": str(data),
            "split": split, "step": state.step}


def _label(i: int, name: str) -> str:
    return name if name == str(i) else f"{i} {name}"


def report(r: dict) -> str:
    """The text report of a result dict: summary, per-class table, confusion matrix."""
    names, conf = r["class_names"], r["confusion"]
    labels = [_label(i, n) for i, n in enumerate(names)]
    w = max(len("class"), *map(len, labels))
    correct = sum(conf[i][i] for i in range(len(conf)))
    lines = [f"checkpoint  {r['checkpoint']} (step {r['step']})",
             f"data        {r['data']} ({r['split']} split, {r['count']} images)",
             f"accuracy    {100 * r['accuracy']:.2f}%  ({correct}/{r['count']})",
             f"loss        {r['loss']:.4f}",
             "",
             f"{'class':<{w}}  {'images':>7}  {'correct':>7}  {'accuracy':>8}"]
    for i, (lab, acc) in enumerate(zip(labels, r["per_class_accuracy"])):
        a = "-" if acc is None else f"{100 * acc:.2f}%"
        lines.append(f"{lab:<{w}}  {sum(conf[i]):>7}  {conf[i][i]:>7}  {a:>8}")
    cw = max(5, len(str(max(max(row) for row in conf))) + 1) if conf else 5
    lines += ["", "confusion matrix (rows: true class, columns: predicted class)",
              f"{'':<{w}}" + "".join(f"{i:>{cw}}" for i in range(len(conf)))]
    for lab, row in zip(labels, conf):
        lines.append(f"{lab:<{w}}" + "".join(f"{v:>{cw}}" for v in row))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dpcnn.evaluate", description=__doc__.split("\n\n")[0],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint file (e.g. runs/latest/best.h5)")
    p.add_argument("--data", type=Path, help="prepared HDF5 data file (default: the one the checkpoint "
                                             "was trained on)")
    p.add_argument("--split", choices=("test", "train"), default="test", help="which split (default test)")
    p.add_argument("--batch-size", type=positive_int, default=EVAL_BATCH,
                   help=f"images per forward pass (default {EVAL_BATCH})")
    p.add_argument("--force", action="store_true", help="evaluate even if the checkpoint was trained on "
                                                        "another data set")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    add_common_flags(p)
    return p


@entry_point
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    setup_logging(args.verbose, args.quiet)
    try:
        r = run(args.checkpoint, args.data, args.split, args.batch_size, args.force)
    except (Exception, KeyboardInterrupt) as e:
        report_error(e, args.debug)
        return EXIT_ERROR
    print(json.dumps(r) if args.json else report(r))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
