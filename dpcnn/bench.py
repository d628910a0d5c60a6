"""Benchmark training steps of a model: images/s and peak memory, against PyTorch when present.

    python -m dpcnn.bench                          # batch 64, one thread
    python -m dpcnn.bench --batch-size 128 --threads 2 --json
    python -m dpcnn.bench --profile [--exact]      # where the time goes, per function
    python -m dpcnn.bench --clock cpu              # CPU time: steadier on a shared machine

A step is forward, backward and the SGD update (momentum 0.9, Nesterov, weight
decay 5e-4) on random inputs. dpcnn's two steps are timed: the float step (one pass
over the batch) and the exact step (micro-batches computed in one stacked pass, exact
sums), with ``exact_cost`` the median over rounds of exact / float - 1. When PyTorch is
importable the same model, batch, optimizer and thread count are timed in the same run.
All of them in alternating rounds, so that all see the same machine noise; the reported
figures are medians over the rounds and ``ratio`` is dpcnn's float step / PyTorch in
images per second.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import tracemalloc

import numpy as np
from threadpoolctl import threadpool_limits

from .cli import Parser, entry_point, positive_int
from .comm import SerialComm
from .config import Config
from .malloc import keep_freed_memory
from .model import ModelSpec
from .node import blas_summary
from .step import TrainStep
from .torchref import torch_model

log = logging.getLogger(__name__)


def _batch(spec: ModelSpec, batch_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch_size,) + spec.input_shape).astype(np.float32)
    return x, rng.integers(0, spec.classes, batch_size)


class Stepper:
    """One dpcnn training step (the trainer's TrainStep, one process) on a fixed random batch,
    run by calling it; ``step`` is the TrainStep."""

    def __init__(self, spec: ModelSpec, batch_size: int, micro_batch: int = Config.micro_batch, seed: int = 0,
                 exact: bool = True, gather: bool = True):
        self.x, self.y = _batch(spec, batch_size, seed)
        self.step = TrainStep(spec, SerialComm(), micro_batch=micro_batch, seed=seed, momentum=0.9, nesterov=True,
                              weight_decay=5e-4, exact=exact, gather=gather)

    def __call__(self):
        return self.step(self.x, self.y, len(self.y), 0.01)


def numpy_stepper(spec: ModelSpec, batch_size: int, micro_batch: int = Config.micro_batch, seed: int = 0,
                  exact: bool = True, gather: bool = True) -> Stepper:
    """The exact step: micro-batches of micro_batch samples in one stacked pass, exact sums (with
    gather=False every gradient a grid sum, fc1's too: the exact step before gathered factors)."""
    return Stepper(spec, batch_size, micro_batch, seed, exact, gather)


def float_stepper(spec: ModelSpec, batch_size: int, seed: int = 0) -> Stepper:
    """The float step: one float32 pass over the whole batch, no micro-batches or exact sums."""
    return Stepper(spec, batch_size, seed=seed, exact=False)


def torch_stepper(spec: ModelSpec, batch_size: int, threads: int, seed: int = 0):
    """(step function, torch version) for the same model and step in PyTorch, or None without torch."""
    try:
        import torch
        from torch import nn
    except ImportError:
        return None
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = torch_model(spec)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss()
    x = torch.randn(batch_size, spec.input_shape[2], spec.input_shape[0], spec.input_shape[1])
    y = torch.randint(0, spec.classes, (batch_size,))

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step, torch.__version__


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def time_steps(step, n: int, clock=time.perf_counter) -> float:
    """Seconds per step, the mean over n steps, by clock (wall time, or this thread's CPU time:
    what a step costs when other programs share the core; BLAS and torch run in this thread
    with one thread)."""
    t0 = clock()
    for _ in range(n):
        step()
    return (clock() - t0) / n


def peak_step_memory_mb(step) -> float:
    """Peak memory allocated (through tracemalloc, which NumPy reports to) during one step."""
    step()
    tracemalloc.start()
    try:
        step()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def run(batch_size: int = 64, threads: int = 1, steps: int = 40, rounds: int = 7,
        spec: ModelSpec | None = None, use_torch: bool = True, micro_batch: int = Config.micro_batch,
        clock: str = "wall") -> dict:
    spec = spec or ModelSpec()
    tick = CLOCKS[clock]
    with threadpool_limits(threads):
        floats = float_stepper(spec, batch_size)
        exact = numpy_stepper(spec, batch_size, micro_batch)
        grid = numpy_stepper(spec, batch_size, micro_batch, gather=False)
        theirs = torch_stepper(spec, batch_size, threads) if use_torch else None
        for _ in range(5):                      # warm-up: allocator, BLAS buffers, caches
            floats()
            exact()
            grid()
            if theirs:
                theirs[0]()
        t_float, t_exact, t_grid, t_theirs = [], [], [], []
        for _ in range(rounds):                 # alternate, so all see the same noise
            t_float.append(time_steps(floats, steps, tick))
            t_exact.append(time_steps(exact, steps, tick))
            t_grid.append(time_steps(grid, steps, tick))
            if theirs:
                t_theirs.append(time_steps(theirs[0], steps, tick))
        peak = peak_step_memory_mb(floats)
        peak_exact = peak_step_memory_mb(exact)
    # what the exact step costs against the float one: per-round ratios (each pair measured
    # back to back), their median and spread
    cost = sorted(a / b - 1 for a, b in zip(t_exact, t_float, strict=True))
    quartiles = statistics.quantiles(cost, n=4) if len(cost) > 1 else [cost[0]] * 3
    result = {
        "images_per_second": round(batch_size / statistics.median(t_float), 1),
        "ms_per_step": round(1e3 * statistics.median(t_float), 3),
        "batch_size": batch_size,
        "micro_batch": micro_batch,
        "threads": threads,
        "clock": clock,
        "exact_images_per_second": round(batch_size / statistics.median(t_exact), 1),
        "exact_ms_per_step": round(1e3 * statistics.median(t_exact), 3),
        "exact_cost": round(statistics.median(cost), 3),
        "exact_cost_quartiles": [round(quartiles[0], 3), round(quartiles[2], 3)],
        "exact_cost_range": [round(cost[0], 3), round(cost[-1], 3)],
        "exact_gathers": exact.step.plan(batch_size) is not None,
        "grid_exact_cost": round(statistics.median(a / b - 1 for a, b in zip(t_grid, t_float, strict=True)), 3),
        "peak_memory_mb": round(peak, 2),
        "exact_peak_memory_mb": round(peak_exact, 2),
        "rounds": rounds,
        "steps_per_round": steps,
        "num_params": spec.num_params,
        "blas": blas_summary(),
        "numpy": np.__version__,
    }
    if theirs:
        result["torch_images_per_second"] = round(batch_size / statistics.median(t_theirs), 1)
        result["torch_ms_per_step"] = round(1e3 * statistics.median(t_theirs), 3)
        result["torch"] = theirs[1]
        # the ratio of medians, and the median of per-round ratios (robust to drifting load)
        result["ratio"] = round(result["images_per_second"] / result["torch_images_per_second"], 3)
        result["ratio_median_of_rounds"] = round(
            statistics.median(b / a for a, b in zip(t_float, t_theirs, strict=True)), 3)
        result["exact_ratio_median_of_rounds"] = round(
            statistics.median(b / a for a, b in zip(t_exact, t_theirs, strict=True)), 3)
    return result


def profile(batch_size: int, threads: int, steps: int, spec: ModelSpec | None = None, exact: bool = False,
            clock: str = "wall", micro_batch: int = Config.micro_batch) -> list[tuple[str, float]]:
    """Time each layer function of a training step (its own time, nested calls excluded), the
    exact sums (``exact.add_rows``, exact=True) and the SGD update.

    Wraps the functions for the measurement and restores them after; returns [(name, ms per
    step)] with the rest of the step (model and step glue, the buffer's conversion) and the
    total last. col2im's time includes the input gradient's matrix products: conv_backward
    hands it a generator that computes one window's block at a time, as col2im adds them up.
    """
    from . import exact as exact_sums
    from . import layers

    tick = CLOCKS[clock]
    names = ("split_planes", "merge_planes", "im2col", "col2im", "conv_forward", "conv_backward",
             "maxpool_forward", "maxpool_backward", "relu_forward", "relu_backward", "dense_forward",
             "dense_backward", "softmax_cross_entropy", "sum_rows", "flatten_forward", "flatten_backward")
    targets = [(layers, n, n) for n in names] + [(exact_sums, "add_rows", "exact.add_rows (round and add)")]
    own: dict[str, float] = {}
    stack = []                                      # [start, time of nested calls]

    def timed(label, f):
        def wrapper(*a, **k):
            stack.append([tick(), 0.0])
            try:
                return f(*a, **k)
            finally:
                t0, nested = stack.pop()
                dt = tick() - t0
                own[label] = own.get(label, 0.0) + dt - nested
                if stack:
                    stack[-1][1] += dt
        return wrapper

    with threadpool_limits(threads):
        stepper = Stepper(spec or ModelSpec(), batch_size, micro_batch, exact=exact)
        for _ in range(5):
            stepper()
        originals = [(mod, n, getattr(mod, n)) for mod, n, _ in targets]
        for (mod, n, label), (_, _, f) in zip(targets, originals, strict=True):
            setattr(mod, n, timed(label, f))
        opt = stepper.step.opt
        opt.step = timed("SGD update", opt.step)         # type: ignore[method-assign]
        try:
            t0 = tick()
            for _ in range(steps):
                stepper()
            total = tick() - t0
        finally:
            for mod, n, f in originals:
                setattr(mod, n, f)
            del opt.step
    rows = sorted(((n, 1e3 * t / steps) for n, t in own.items() if t), key=lambda r: -r[1])
    rows.append(("everything else (model and step glue)", 1e3 * total / steps - sum(ms for _, ms in rows)))
    rows.append(("total", 1e3 * total / steps))
    return rows


@entry_point
def main(argv=None) -> int:
    ap = Parser(
        prog="python -m dpcnn.bench", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python -m dpcnn.bench --batch-size 64 --threads 1\n"
               "  python -m dpcnn.bench --json --no-torch\n  python -m dpcnn.bench --profile")
    ap.add_argument("--batch-size", type=positive_int, default=64, help="images per step (default 64)")
    ap.add_argument("--micro-batch", type=positive_int, default=Config.micro_batch,
                    help=f"dpcnn's micro-batch, as in training (default {Config.micro_batch})")
    ap.add_argument("--threads", type=positive_int, default=1, help="BLAS and torch threads (default 1)")
    ap.add_argument("--steps", type=positive_int, default=40, help="steps per timing round (default 40)")
    ap.add_argument("--rounds", type=positive_int, default=7, help="timing rounds; medians are reported (default 7)")
    ap.add_argument("--no-torch", action="store_true", help="do not time PyTorch even if it is installed")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall time (default), or this thread's CPU time (steadier when other programs share the core)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--profile", action="store_true", help="time each layer function of dpcnn's step instead")
    ap.add_argument("--exact", action="store_true", help="with --profile: the exact step (default: the float step)")
    args = ap.parse_args(argv)
    keep_freed_memory()                        # as the trainer does (PyTorch, in this process, gets it too)
    if args.profile:
        rows = profile(args.batch_size, args.threads, args.steps, exact=args.exact, clock=args.clock,
                       micro_batch=args.micro_batch)
        which = (f"the exact step, micro-batches of {args.micro_batch} in one stacked pass" if args.exact
                 else "the float step, one pass over the batch")
        if args.json:
            print(json.dumps({"batch_size": args.batch_size, "threads": args.threads, "exact": args.exact,
                              "clock": args.clock, "ms_per_step": dict(rows)}))
            return 0
        print(f"where a training step goes ({which}): batch {args.batch_size}, {args.threads} thread(s), "
              f"{args.clock} clock, mean of {args.steps} steps (own time of each function, matrix products included)")
        for name, ms in rows:
            print(f"  {name:<42} {ms:7.3f} ms  {100 * ms / rows[-1][1]:5.1f}%")
        return 0
    r = run(args.batch_size, args.threads, args.steps, args.rounds, use_torch=not args.no_torch,
            micro_batch=args.micro_batch, clock=args.clock)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"dpcnn:   {r['images_per_second']:9.0f} images/s  ({r['ms_per_step']:.2f} ms/step, batch "
          f"{r['batch_size']}, {r['threads']} thread(s), peak step memory {r['peak_memory_mb']:.1f} MB): "
          f"the float step")
    q, lo_hi = r["exact_cost_quartiles"], r["exact_cost_range"]
    print(f"         {r['exact_images_per_second']:9.0f} images/s  ({r['exact_ms_per_step']:.2f} ms/step, peak step "
          f"memory {r['exact_peak_memory_mb']:.1f} MB): the exact step (--exact, micro-batches of {r['micro_batch']})")
    print(f"exact against float: {100 * r['exact_cost']:+.1f}% (median of {r['rounds']} rounds; quartiles "
          f"{100 * q[0]:+.1f}% .. {100 * q[1]:+.1f}%, range {100 * lo_hi[0]:+.1f}% .. {100 * lo_hi[1]:+.1f}%; "
          f"{r['clock']} clock)")
    print(f"  (every gradient a grid sum, the exact step before fc1's gathered factors: "
          f"{100 * r['grid_exact_cost']:+.1f}%)")
    if "torch_images_per_second" in r:
        print(f"PyTorch: {r['torch_images_per_second']:9.0f} images/s  ({r['torch_ms_per_step']:.2f} ms/step, "
              f"torch {r['torch']})")
        print(f"ratio dpcnn/PyTorch: {r['ratio']:.2f} (median of per-round ratios {r['ratio_median_of_rounds']:.2f}; "
              f"exact step {r['exact_ratio_median_of_rounds']:.2f})")
    else:
        print("PyTorch not importable: no comparison "
              "(add one: pip install torch --index-url https://download.pytorch.org/whl/cpu)")
    print(f"BLAS: {r['blas']}; NumPy {r['numpy']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
