"""What every dpcnn command shares: logging set-up and one-line errors.

Only rank 0 logs at INFO by default; other ranks log warnings and errors, tagged
with their rank. ``-v`` shows debug messages, ``-q`` only warnings and errors.
Errors print as one line (``error: ...``) unless ``--debug`` asks for the traceback.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import traceback

# Exit statuses of every command. 75 is EX_TEMPFAIL: the Slurm script requeues on it; 69
# (EX_UNAVAILABLE) means a rank or node stopped responding (the stall watchdog ended the job).
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_STALLED, EXIT_STOPPED, EXIT_INTERRUPTED = 0, 1, 2, 69, 75, 130


class UserError(Exception):
    """An error the user can fix, whose message says it all: printed as is, on one line.

    Every module's own error (DataError, CheckpointError, CommError, ...) derives from it.
    """


class Parser(argparse.ArgumentParser):
    """argparse, with a bad command line reported as every other error is: one line,
    ``error: argument --flag: expected ..., got ... (see PROG --help)``, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


# argparse types: a bad value becomes "argument --flag: expected ..., got ..." and exit status 2.

def positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {s}")
    return v


def nonneg_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s}")
    return v


def positive_float(s: str) -> float:
    v = float(s)
    if not 0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {s}")
    return v


def int_list(s: str) -> tuple[int, ...]:
    """'8,16' -> (8, 16): comma-separated integers >= 1."""
    try:
        v = tuple(int(t) for t in s.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if any(t < 1 for t in v):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {s!r}")
    return v


def nonneg_float(s: str) -> float:
    v = float(s)
    if not 0 <= v < float("inf"):                 # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {s}")
    return v


def unit_interval(s: str) -> float:
    """A number in [0, 1)."""
    v = float(s)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {s}")
    return v


def open_unit_interval(s: str) -> float:
    """A number in (0, 1)."""
    v = float(s)
    if not 0 < v < 1:                                   # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {s}")
    return v


def float_in(lo: float, hi: float, what: str):
    """An argparse type: a number in [lo, hi] ("expected <what> in [lo, hi], got ..." otherwise)."""
    def parse(s: str) -> float:
        v = float(s)
        if not lo <= v <= hi:                        # NaN fails too
            raise argparse.ArgumentTypeError(f"expected {what} in [{lo:g}, {hi:g}], got {s}")
        return v
    parse.__name__ = what.removeprefix("a ")         # argparse's "invalid <name> value: 'x'"
    return parse


def float_list(s: str) -> tuple[float, ...]:
    """'0.5,0.75' -> (0.5, 0.75): comma-separated finite numbers > 0."""
    try:
        v = tuple(float(t) for t in s.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None
    if not all(0 < t < float("inf") for t in v):
        raise argparse.ArgumentTypeError(f"expected finite numbers > 0, got {s!r}")
    return v


def add_common_flags(p: argparse.ArgumentParser) -> None:
    from . import __version__
    g = p.add_argument_group("output")
    g.add_argument("--version", action="version", version=f"dpcnn {__version__}")
    g.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    g.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    g.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def setup_logging(verbose: bool = False, quiet: bool = False, rank: int = 0) -> None:
    """The console on stderr at the level the flags ask (rank 0: INFO, -q: warnings, -v: DEBUG; other
    ranks: warnings). The level is the console handler's: the root logger stays at INFO (DEBUG with
    -v), so a file handler added later (train.log, ``RunDir.attach_log``) gets the INFO lines however
    quiet the console is."""
    console = logging.DEBUG if verbose else logging.WARNING if (quiet or rank != 0) else logging.INFO
    fmt = f"[rank {rank}] %(message)s" if rank else "%(message)s"
    logging.basicConfig(level=min(console, logging.INFO), format=fmt, stream=sys.stderr, force=True)
    for h in logging.getLogger().handlers:
        h.setLevel(console)


def console_shows(level: int, name: str = "dpcnn") -> bool:
    """Whether a message of `level` from logger `name` reaches the console (a root handler writing to a
    stream that is not a file): what decides whether a progress bar is drawn."""
    return logging.getLogger(name).isEnabledFor(level) and any(
        type(h) is logging.StreamHandler and level >= h.level for h in logging.getLogger().handlers)


def error_line(e: BaseException) -> str:
    """One line for the user: the message, with the exception type only when it adds something."""
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    msg = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, (UserError, FileNotFoundError, PermissionError)):
        return msg
    return f"{type(e).__name__}: {msg}"


def report_error(e: BaseException, debug: bool = False, prefix: str = "") -> str:
    """Print ``error: <one line>`` to stderr (the traceback first with --debug); return the line.

    A closed stdout (``... | head``) is not an error: nothing is printed."""
    if isinstance(e, BrokenPipeError):
        _stdout_to_devnull()
        return ""
    if debug:
        traceback.print_exc()
    line = prefix + error_line(e)
    print(f"error: {line}", file=sys.stderr, flush=True)
    return line


def _stdout_to_devnull() -> None:
    """After the reader of stdout went away: send the rest, and the flush at exit, nowhere."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def entry_point(main):
    """Decorate a command's main(): stop quietly when stdout's reader goes away, like Unix tools
    (``python -m dpcnn.data info data/mnist.h5 | head -3``)."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            code = main(*args, **kwargs)
            sys.stdout.flush()
            return code
        except BrokenPipeError:
            _stdout_to_devnull()
            return 1
    return wrapper
