"""Evaluate a checkpoint on a prepared data set: accuracy, loss, per-class accuracy, confusion matrix.

    python -m dpcnn.evaluate --checkpoint runs/latest/best.h5
    python -m dpcnn.evaluate --checkpoint runs/latest/best.h5 --data data/mnist.h5 --json

One process, no MPI. The data file defaults to the one the checkpoint was trained on
(``config["data"]`` in the checkpoint). Images are standardised with that file's mean
and std, as in training. A checkpoint trained on another data set (its fingerprint
differs from the file's) is refused unless ``--force``.

Splits: ``test`` (the default), ``val`` (the rows the run held out of the training split
for validation, found again from its --val-size and --val-seed) and ``train`` (the rows
it trained on: the training split less the validation rows).

Exit status: 0 done, 1 error, 2 bad command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from .checkpoint import CheckpointError, check_data, load_model, recorded_data_path
from .cli import EXIT_ERROR, EXIT_OK, Parser, add_common_flags, entry_point, positive_int, report_error, setup_logging
from .config import Config
from .data import Split, holdout
from .malloc import keep_freed_memory
from .metrics import evaluate
from .model import EVAL_BATCH

log = logging.getLogger("dpcnn")

EPILOG = """\
examples:
  python -m dpcnn.evaluate --checkpoint runs/latest/best.h5
  python -m dpcnn.evaluate --checkpoint runs/latest/ckpt-step000007496.h5 --data data/mnist.h5
  python -m dpcnn.evaluate --checkpoint runs/latest/best.h5 --json > eval.json
  python -m dpcnn.evaluate --checkpoint runs/latest/best.h5 --split val     the held-out validation rows
  python -m dpcnn.evaluate --checkpoint runs/latest/best.h5 --split train   the rows it trained on
  dpcnn-evaluate --checkpoint runs/latest/best.h5      the same, as a console script

--json prints one object: accuracy, loss, count, per_class_accuracy, confusion (rows: true
class, columns: predicted class), class_names, checkpoint, data, split, step.
exit status: 0 done, 1 error, 2 bad command line.
"""


# ----------------------------------------------------------------------------- evaluation


SPLITS = ("test", "val", "train")


def run(checkpoint: Path, data: Path | None = None, split: str = "test", batch_size: int = EVAL_BATCH,
        force: bool = False) -> dict:
    """Evaluate a checkpoint on one split (test, val or train) of a data file -> the dict --json prints."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    checkpoint = Path(checkpoint)
    model, state = load_model(checkpoint)
    if data is None:
        data = recorded_data_path(state, checkpoint)
        if not data.is_file():
            raise CheckpointError(f"{data}: no such file (the data file recorded in {checkpoint}); "
                                  "pass --data")
    with Split(data, "test" if split == "test" else "train") as s:
        check_data(state, checkpoint, s, model, force)
        if split == "test":
            x, y = s.read(0, s.n)
        else:
            rows = split_rows(state.settings, s.n, split, checkpoint)
            x, y = s.standardise(s.rows(rows)), s.labels[rows].astype(np.int64)
        log.info("evaluating %s (step %d) on %s, %s split, %d images", checkpoint, state.step, s.path, split, len(y))
        totals = evaluate(model, x, y, batch_size)
        names = list(s.class_names)
    return {**totals.summary(), "class_names": names, "checkpoint": str(checkpoint), "data": str(data),
            "split": split, "step": state.step}


def split_rows(config: Config, n: int, split: str, checkpoint: Path) -> np.ndarray:
    """The training-split rows (sorted) that a run with this config trained on ("train") or held out
    for validation ("val"), drawn again as the trainer drew them."""
    size, seed = config.val_size or 0, config.val_seed
    if split == "val" and not size:
        raise CheckpointError(f"{checkpoint}: its run held out no validation rows (--val-size 0); "
                              "use --split test or --split train")
    if size >= n:
        raise CheckpointError(f"{checkpoint}: its run held out {size} validation rows, but this training "
                              f"split has only {n}")
    train_rows, val_rows = holdout(n, size, seed)
    return val_rows if split == "val" else train_rows


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
    p = Parser(prog="python -m dpcnn.evaluate", description=__doc__.split("\n\n")[0],
               epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint file (e.g. runs/latest/best.h5)")
    p.add_argument("--data", type=Path, help="prepared HDF5 data file (default: the one the checkpoint "
                                             "was trained on)")
    p.add_argument("--split", choices=SPLITS, default="test",
                   help="test (default); val: the rows the run held out for validation; train: the rows it "
                        "trained on")
    p.add_argument("--batch-size", type=positive_int, default=EVAL_BATCH,
                   help=f"images per forward pass (default {EVAL_BATCH})")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="BLAS threads (default 1, as training's default: the loss and accuracy then match "
                        "the run's records bit for bit)")
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
        with threadpool_limits(args.threads):
            r = run(args.checkpoint, args.data, args.split, args.batch_size, args.force)
    except (Exception, KeyboardInterrupt) as e:
        report_error(e, args.debug)
        return EXIT_ERROR
    print(json.dumps(r) if args.json else report(r))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
