"""Plot a run's metrics.jsonl: loss, accuracy and throughput per epoch, as one PNG.

    python -m dpcnn.plot runs/latest                  # writes runs/latest/metrics.png
    python -m dpcnn.plot runs/latest --out loss.png

Three panels sharing the epoch axis: training, validation and test loss; validation and
test accuracy (training accuracy dashed, for comparison), with the best record starred:
the best validation accuracy, which is how best.h5 is chosen (the best test accuracy only
for runs without a validation split); images per second of training. Needs matplotlib
(the optional extra ``plot``); it draws with the Agg backend, so no display is needed.

Exit status: 0 done, 1 error, 2 bad command line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .cli import EXIT_ERROR, EXIT_OK, Parser, UserError, add_common_flags, entry_point, report_error, setup_logging
from .records import Record, RecordsError, read_records

log = logging.getLogger("dpcnn")

METRICS = "metrics.jsonl"

EPILOG = """\
examples:
  python -m dpcnn.plot runs/latest                     writes runs/latest/metrics.png
  python -m dpcnn.plot runs/latest --out /tmp/run.png
  python -m dpcnn.plot runs/latest/metrics.jsonl       a metrics file directly
  dpcnn-plot runs/latest                               the same, as a console script

needs matplotlib: pip install "dpcnn[plot]"   (or: pip install matplotlib)
exit status: 0 done, 1 error, 2 bad command line.
"""


class PlotError(UserError):
    """A missing or unreadable metrics file, or no matplotlib (one-line message)."""


def metrics_path(run: Path) -> Path:
    """RUN_DIR or a metrics file itself -> the metrics file."""
    run = Path(run)
    if not run.exists():
        raise PlotError(f"{run}: no such run directory or metrics file")
    return run / METRICS if run.is_dir() else run


def read_metrics(path: Path) -> list[Record]:
    """The records of a metrics.jsonl file, in order; PlotError naming the file and line if bad."""
    path = Path(path)
    if not path.is_file():
        raise PlotError(f"{path}: no such file; is {path.parent} a dpcnn run directory "
                        "(python -m dpcnn.train --out DIR)?")
    with open(path, "rb") as fb:
        if fb.read(8) == b"\x89HDF\r\n\x1a\n":
            raise PlotError(f"{path}: an HDF5 file (a checkpoint or a data file), not a metrics.jsonl; "
                            "give the run directory")
    try:
        records = read_records(path)
    except RecordsError as e:
        raise PlotError(str(e)) from None
    if not records:
        raise PlotError(f"{path}: no records yet; the run writes one per evaluation (each epoch's end, "
                        "or every --eval-every steps)")
    return records


def _series(records: list[Record], name: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of the records whose field `name` holds a number."""
    pts = [(r.epoch, getattr(r, name)) for r in records if isinstance(getattr(r, name), (int, float))]
    return [e for e, _ in pts], [v for _, v in pts]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotError('plotting needs matplotlib: pip install "dpcnn[plot]" (or pip install matplotlib)') \
            from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker
    return plt, ticker


CURVES = (("train", "tab:blue"), ("val", "tab:purple"), ("test", "tab:orange"))
NAMES = {"train": "train", "val": "validation", "test": "test"}


def best_record(records: list[Record]) -> tuple[str, float, float] | None:
    """(split, epoch, accuracy %) of the record best.h5 follows: the best validation accuracy, or the best
    test accuracy in a run without a validation split; the first of equals, as the trainer keeps it."""
    for split in ("val", "test"):
        e, v = _series(records, f"{split}_accuracy")
        if e:
            i = max(range(len(v)), key=v.__getitem__)
            return split, e[i], 100 * v[i]
    return None


STYLE = dict(marker="o", markersize=3.5, linewidth=1.6)


def draw(records: list[Record], title: str = ""):
    """The figure of the records: loss, accuracy and throughput panels sharing the epoch axis."""
    plt, ticker = _pyplot()
    fig, (ax_loss, ax_acc, ax_ips) = plt.subplots(
        3, 1, sharex=True, figsize=(8, 8.5), gridspec_kw={"height_ratios": [3, 3, 1.4]})
    _loss_panel(ax_loss, records, ticker)
    _accuracy_panel(ax_acc, records)
    _throughput_panel(ax_ips, records)
    for ax in (ax_loss, ax_acc, ax_ips):
        ax.grid(True, alpha=0.3)
    last_epoch = max(r.epoch for r in records)
    ax_ips.set_xlim(0, last_epoch * 1.04 if last_epoch > 0 else 1)    # keep the last points off the frame
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def _loss_panel(ax, records: list[Record], ticker) -> None:
    for split, color in CURVES:
        e, v = _series(records, f"{split}_loss")
        if e:
            ax.plot(e, v, label=NAMES[split], color=color, **STYLE)
    losses = [x for split, _ in CURVES for x in _series(records, f"{split}_loss")[1]]
    if losses and min(losses) > 0 and max(losses) / min(losses) > 10:
        ax.set_yscale("log")                            # plain numbers on the ticks, not 2x10^-1
        ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_ylabel("cross-entropy loss")
    ax.legend(loc="best")


def _accuracy_panel(ax, records: list[Record]) -> None:
    te, tv = _series(records, "train_accuracy")
    if te:
        ax.plot(te, [100 * a for a in tv], label="train (mean since last record)", color="tab:blue",
                linestyle="--", alpha=0.6, **STYLE)
    held = []                                           # validation and test accuracies (%), to scale the axis
    for split, color in CURVES[1:]:
        e, v = _series(records, f"{split}_accuracy")
        if e:
            held += [100 * a for a in v]
            ax.plot(e, [100 * a for a in v], label=NAMES[split], color=color, **STYLE)
    best = best_record(records)
    if best:
        split, be, bacc = best
        last = {s: _series(records, f"{s}_accuracy") for s, _ in CURVES[1:]}
        ax.plot([be], [bacc], marker="*", markersize=13, color="tab:red", linestyle="none",
                label=f"best {NAMES[split]} (best.h5)")
        said = [f"last {NAMES[s]} {100 * v[-1]:.2f}%" for s, (e, v) in last.items() if e]
        ax.set_title(f"{', '.join(said)} (epoch {records[-1].epoch:.3g}); best {NAMES[split]} "
                     f"{bacc:.2f}% (epoch {be:.3g})", fontsize=9, loc="left")
        # scale to the held-out curves and the training points near them; early, low training points may fall below
        shown = held + [100 * a for a in tv if 100 * a >= min(held) - 5]
        lo, hi = min(shown), max(shown)
        pad = max(0.5, 0.15 * (hi - lo))
        bottom = max(lo - pad, 0)
        ax.set_ylim(bottom, min(hi + pad, 100.5))
        below = [(x, 100 * a) for x, a in zip(te, tv) if 100 * a < bottom]
        if below:                                       # say so, at the axis, instead of clipping silently
            ax.plot([x for x, _ in below], [bottom] * len(below), marker="v", markersize=7, linestyle="none",
                    color="tab:blue", alpha=0.6, clip_on=False,
                    label=f"train, below the axis ({', '.join(f'{a:.1f}%' for _, a in below[:3])})")
    ax.set_ylabel("accuracy (%)")
    ax.legend(loc="best")


def _throughput_panel(ax, records: list[Record]) -> None:
    e, v = _series(records, "images_per_second")
    ax.plot(e, v, color="tab:green", **STYLE)
    ax.set_ylabel("images/s")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("epoch")
    sizes = sorted({int(r.world_size) for r in records if r.world_size})
    if sizes:
        ax.set_title(f"training throughput, {'/'.join(map(str, sizes))} rank(s)", fontsize=9, loc="left")


def plot(records: list[Record], out: Path, title: str = "") -> Path:
    """Draw the three panels of the records into the image `out` (.png, .pdf, .svg); returns out."""
    plt, _ = _pyplot()
    fig = draw(records, title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def title_of(records: list[Record], path: Path) -> str:
    last = records[-1]
    bits = [str(path.parent.resolve().name or path.parent)]
    bits.append(f"step {last.step}")
    if last.global_batch_size:
        bits.append(f"global batch {last.global_batch_size}")
    if last.elapsed_seconds is not None:
        bits.append(f"{last.elapsed_seconds:.0f} s")
    return ", ".join(bits)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m dpcnn.plot", description=__doc__.split("\n\n")[0],
               epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, metavar="RUN_DIR", help="run directory (or its metrics.jsonl)")
    p.add_argument("--out", type=Path, help="image to write: .png, .pdf or .svg, or a directory "
                                            "(default RUN_DIR/metrics.png)")
    add_common_flags(p)
    return p


@entry_point
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    try:
        src = metrics_path(args.run)
        records = read_metrics(src)
        out = args.out or src.parent / "metrics.png"
        if out.is_dir():
            out = out / "metrics.png"
        if out.suffix.lower() not in (".png", ".pdf", ".svg"):
            raise PlotError(f"--out {out}: expected a .png, .pdf or .svg file name (or a directory)")
        out = plot(records, out, title_of(records, src))
    except (Exception, KeyboardInterrupt) as e:
        report_error(e, args.debug)
        return EXIT_ERROR
    log.info("wrote %s (%d records)", out, len(records))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
