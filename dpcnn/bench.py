"""Benchmark training steps of a model: images/s and peak memory, against PyTorch when present.

    python -m dpcnn.bench                          # batch 64, one thread
    python -m dpcnn.bench --batch-size 128 --threads 2 --json
    python -m dpcnn.bench --profile                # where the time goes, per function

A step is forward, backward and the SGD update (momentum 0.9, Nesterov, weight
decay 5e-4) on random inputs. When PyTorch is importable the same model, batch,
optimizer and thread count are timed in the same run, in alternating rounds so
that both see the same machine noise; the reported figures are medians over the
rounds and ``ratio`` is dpcnn / PyTorch images per second.
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


def numpy_stepper(spec: ModelSpec, batch_size: int, micro_batch: int = Config.micro_batch, seed: int = 0,
                  exact: bool = True):
    """A function that runs one dpcnn training step (the trainer's TrainStep, one process) on a
    fixed random batch."""
    x, y = _batch(spec, batch_size, seed)
    step = TrainStep(spec, SerialComm(), micro_batch=micro_batch, seed=seed, momentum=0.9, nesterov=True,
                     weight_decay=5e-4, exact=exact)
    return lambda: step(x, y, batch_size, 0.01)


def float_stepper(spec: ModelSpec, batch_size: int, seed: int = 0):
    """The default step: one float32 pass over the whole batch, no micro-batches or exact sums."""
    return numpy_stepper(spec, batch_size, seed=seed, exact=False)


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


def time_steps(step, n: int) -> float:
    """Seconds per step, the mean over n steps."""
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n


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
        spec: ModelSpec | None = None, use_torch: bool = True, micro_batch: int = Config.micro_batch) -> dict:
    spec = spec or ModelSpec()
    with threadpool_limits(threads):
        ours = float_stepper(spec, batch_size)                      # the default step
        exact = numpy_stepper(spec, batch_size, micro_batch)        # --exact
        theirs = torch_stepper(spec, batch_size, threads) if use_torch else None
        for _ in range(5):                      # warm-up: allocator, BLAS buffers, caches
            ours()
            exact()
            if theirs:
                theirs[0]()
        t_ours, t_exact, t_theirs = [], [], []
        for _ in range(rounds):                 # alternate, so all see the same noise
            t_ours.append(time_steps(ours, steps))
            t_exact.append(time_steps(exact, steps))
            if theirs:
                t_theirs.append(time_steps(theirs[0], steps))
        peak = peak_step_memory_mb(ours)
    result = {
        "images_per_second": round(batch_size / statistics.median(t_ours), 1),
        "ms_per_step": round(1e3 * statistics.median(t_ours), 3),
        "batch_size": batch_size,
        "micro_batch": micro_batch,
        "threads": threads,
        # what --exact costs: its step against the default one, median of per-round ratios
        "exact_ms_per_step": round(1e3 * statistics.median(t_exact), 3),
        "exact_cost": round(statistics.median(a / b for a, b in zip(t_exact, t_ours, strict=True)) - 1, 3),
        "peak_memory_mb": round(peak, 2),
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
            statistics.median(b / a for a, b in zip(t_ours, t_theirs, strict=True)), 3)
    return result


def profile(batch_size: int, threads: int, steps: int, spec: ModelSpec | None = None) -> list[tuple[str, float]]:
    """Time each layer function of a training step (its own time, nested calls excluded).

    Wraps the functions of dpcnn.layers for the measurement and restores them after;
    returns [(name, ms per step)] with the optimizer and the rest of the step last.
    col2im's time includes the input gradient's matrix products: conv_backward hands it a
    generator that computes one window's block at a time, as col2im adds them up.
    """
    from . import layers

    names = ("split_planes", "merge_planes", "im2col", "col2im", "conv_forward", "conv_backward",
             "maxpool_forward", "maxpool_backward", "relu_forward", "relu_backward", "dense_forward",
             "dense_backward", "softmax_cross_entropy", "sum_rows")
    own = dict.fromkeys(names, 0.0)
    stack = []                                      # [start, time of nested calls]
    originals = {n: getattr(layers, n) for n in names}

    def timed(name, f):
        def wrapper(*a, **k):
            stack.append([time.perf_counter(), 0.0])
            try:
                return f(*a, **k)
            finally:
                t0, nested = stack.pop()
                dt = time.perf_counter() - t0
                own[name] += dt - nested
                if stack:
                    stack[-1][1] += dt
        return wrapper

    with threadpool_limits(threads):
        model_step = float_stepper(spec or ModelSpec(), batch_size)
        for _ in range(5):
            model_step()
        for n, f in originals.items():
            setattr(layers, n, timed(n, f))
        try:
            t0 = time.perf_counter()
            for _ in range(steps):
                model_step()
            total = time.perf_counter() - t0
        finally:
            for n, f in originals.items():
                setattr(layers, n, f)
    rows = sorted(((n, 1e3 * t / steps) for n, t in own.items() if t), key=lambda r: -r[1])
    rows.append(("everything else (model glue, SGD update)", 1e3 * total / steps - sum(ms for _, ms in rows)))
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
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--profile", action="store_true", help="time each layer function of dpcnn's default step instead")
    args = ap.parse_args(argv)
    keep_freed_memory()                        # as the trainer does (PyTorch, in this process, gets it too)
    if args.profile:
        rows = profile(args.batch_size, args.threads, args.steps)
        if args.json:
            print(json.dumps({"batch_size": args.batch_size, "threads": args.threads, "ms_per_step": dict(rows)}))
            return 0
        print(f"where a training step goes (the default float step, one pass over the batch): batch "
              f"{args.batch_size}, {args.threads} thread(s), mean of "
              f"{args.steps} steps (own time of each layer function, matrix products included)")
        for name, ms in rows:
            print(f"  {name:<42} {ms:7.3f} ms  {100 * ms / rows[-1][1]:5.1f}%")
        return 0
    r = run(args.batch_size, args.threads, args.steps, args.rounds, use_torch=not args.no_torch,
            micro_batch=args.micro_batch)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"dpcnn:   {r['images_per_second']:9.0f} images/s  ({r['ms_per_step']:.2f} ms/step, batch "
          f"{r['batch_size']}, {r['threads']} thread(s), peak step memory {r['peak_memory_mb']:.1f} MB)")
    print(f"         --exact (micro-batches of {r['micro_batch']}, exact sums): {r['exact_ms_per_step']:.2f} ms/step, "
          f"{100 * r['exact_cost']:+.1f}%")
    if "torch_images_per_second" in r:
        print(f"PyTorch: {r['torch_images_per_second']:9.0f} images/s  ({r['torch_ms_per_step']:.2f} ms/step, "
              f"torch {r['torch']})")
        print(f"ratio dpcnn/PyTorch: {r['ratio']:.2f} (median of per-round ratios {r['ratio_median_of_rounds']:.2f})")
    else:
        print("PyTorch not importable: no comparison "
              "(add one: pip install torch --index-url https://download.pytorch.org/whl/cpu)")
    print(f"BLAS: {r['blas']}; NumPy {r['numpy']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
