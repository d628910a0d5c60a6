"""Scaling benchmark: P ranks, a fixed batch per rank, one BLAS thread per rank.

    python -m dpcnn.scaling --ranks 1,2,4,8,16 --per-rank-batch 32
    python -m dpcnn.scaling --ranks 1,2 --json        # one JSON line per P
    python -m dpcnn.scaling --ranks 1,2 --repeat 5    # median of 5 launches per P (default 3)

For each P it launches ``mpiexec -n P python -m dpcnn.scaling --worker`` (``--repeat``
times, reporting the median) and reports total images/s, parallel efficiency against
P = 1, and the time per step in the allreduce, split into waiting for slower ranks (a
barrier just before it) and the transfer itself. Beside the wait it prints the compute
imbalance (per step, the slowest rank's compute time minus the mean; averaged) and the
99th percentile of compute time: a wait much larger than the imbalance means ranks lose
time outside compute (descheduled, page faults in MPI, a slow barrier), not to uneven
work. With PyTorch importable it also runs PyTorch DDP (gloo, CPU) on the same model,
per-rank batch and thread count, launched the same way and alternating with dpcnn, and
prints its images/s beside ours. Inputs are random: this measures compute and
communication, not reading.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from .cli import Parser, entry_point, int_list, nonneg_int, positive_float, positive_int
from .comm import Comm, get_comm
from .config import Config
from .data import micro_bounds
from .malloc import keep_freed_memory
from .model import ModelSpec
from .node import find_mpiexec
from .step import StepBuffer, TrainStep


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_dpcnn(comm: Comm, batch: int, steps: int, warmup: int, micro_batch: int, exact: bool,
                 overlap: bool = False, barrier: bool = True, gather: bool = True) -> dict | None:
    """One rank of the dpcnn measurement (the trainer's TrainStep); returns the summary on rank 0."""
    threadpool_limits(1)
    keep_freed_memory()
    rng = np.random.default_rng(comm.rank)
    lo, hi = micro_bounds(batch * comm.size, micro_batch, comm.rank, comm.size) if exact else (0, batch)
    x = rng.standard_normal((hi - lo, 28, 28, 1)).astype(np.float32)      # the share the trainer's loader gives
    y = rng.integers(0, 10, hi - lo)
    step = TrainStep(ModelSpec(), comm, micro_batch=micro_batch, exact=exact, seed=0, momentum=0.9, nesterov=True,
                     weight_decay=5e-4, overlap=overlap, gather=gather)
    times = np.zeros((steps, 4))               # per timed step: compute, wait, transfer, of it the dense wait
    start = time.perf_counter()
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        step.compute(x, y, batch * comm.size)
        t1 = time.perf_counter()
        if barrier:
            comm.barrier()                            # waiting for the slowest rank
        t2 = time.perf_counter()
        step.reduce()                                 # the transfer itself
        t3 = time.perf_counter()
        step.update(batch * comm.size, 0.01)
        if i == warmup - 1:
            comm.barrier()
            start = time.perf_counter()
        elif i >= warmup:
            times[i - warmup] = (t1 - t0, t2 - t1, t3 - t2, step.t_dense_wait)
    comm.barrier()
    wall = time.perf_counter() - start
    every = np.array(comm.allgather_obj(times.tolist()))   # (ranks, steps, 4)
    if not comm.is_root:
        return None
    return {"framework": "dpcnn", "ranks": comm.size, "per_rank_batch": batch, "steps": steps,
            **summarise(every[:, :, :3], wall, batch), "allreduce_bytes": step.message_bytes(batch * comm.size),
            "overlap": step.overlap, "barrier": barrier, "gathered": step.plan(batch * comm.size) is not None,
            "dense_wait_ms": round(1e3 * every[:, :, 3].mean(), 3)}


def summarise(times: np.ndarray, wall: float, batch: int) -> dict:
    """Figures of a measurement from per-rank, per-step timings.

    times: (ranks, steps, 3) seconds of compute, wait (barrier) and transfer (allreduce) per
    step; wall: seconds for all the steps. The imbalance is what a step costs when ranks differ
    only in compute time: per step, the slowest rank's compute minus the mean, averaged."""
    P, steps, _ = times.shape
    tm = times.mean(axis=(0, 1))
    c = times[:, :, 0]
    imbalance = np.mean(c.max(axis=0) - c.mean(axis=0))
    return {"images_per_second": round(P * batch * steps / wall, 1), "ms_per_step": round(1e3 * wall / steps, 3),
            "compute_ms": round(1e3 * tm[0], 3), "allreduce_wait_ms": round(1e3 * tm[1], 3),
            "allreduce_transfer_ms": round(1e3 * tm[2], 3), "compute_p99_ms": round(1e3 * np.percentile(c, 99), 3),
            "imbalance_ms": round(1e3 * imbalance, 3)}


def efficiency(images_per_second: float, P: int, base: float) -> float:
    """Weak-scaling efficiency: P ranks' throughput against P times one rank's (base)."""
    return round(images_per_second / (P * base), 3)


def worker_torch(batch: int, steps: int, warmup: int) -> dict | None:
    """One rank of the PyTorch DDP (gloo) measurement, started by mpiexec (PMI_RANK/PMI_SIZE)."""
    import torch
    import torch.distributed as dist
    from torch import nn

    from .torchref import torch_model

    rank, size = int(os.environ["PMI_RANK"]), int(os.environ["PMI_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    ddp = nn.parallel.DistributedDataParallel(torch_model(ModelSpec()))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss()
    torch.manual_seed(rank)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    start = time.perf_counter()
    for i in range(warmup + steps):
        opt.zero_grad(set_to_none=True)
        loss_fn(ddp(x), y).backward()
        opt.step()
        if i == warmup - 1:
            dist.barrier()
            start = time.perf_counter()
    dist.barrier()
    wall = time.perf_counter() - start
    dist.destroy_process_group()
    if rank:
        return None
    return {"framework": "torch-ddp", "ranks": size, "per_rank_batch": batch, "steps": steps,
            "images_per_second": round(size * batch * steps / wall, 1), "ms_per_step": round(1e3 * wall / steps, 3),
            "torch": torch.__version__}


def median_run(runs: list[dict]) -> dict | None:
    """The run with the median images/s (the lower middle one for an even count), with all the
    launches' images/s beside it."""
    if not runs:
        return None
    ordered = sorted(runs, key=lambda x: x["images_per_second"])
    return {**ordered[(len(ordered) - 1) // 2], "images_per_second_runs": [x["images_per_second"] for x in runs]}


def launch(framework: str, P: int, args) -> dict:
    mpiexec = find_mpiexec()
    if mpiexec is None:
        raise SystemExit("error: mpiexec not found (pip install mpich, or load your site MPI)")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    bind = ["-bind-to", args.bind_to] if args.bind_to != "none" else []      # MPICH hydra's syntax
    cmd = [mpiexec, *shlex.split(args.mpiexec_args), "-n", str(P), *bind,
           sys.executable, "-m", "dpcnn.scaling", "--worker", framework,
           "--per-rank-batch", str(args.per_rank_batch), "--micro-batch", str(args.micro_batch),
           *(["--exact"] if args.exact else []), *(["--overlap"] if args.overlap else []),
           *(["--no-barrier"] if args.no_barrier else []), *(["--no-gather"] if args.no_gather else []),
           "--steps", str(args.steps), "--warmup", str(args.warmup)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"error: {framework} at P={P} did not finish within --timeout {args.timeout:g} s") from None
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode or not lines:
        last = [ln for ln in r.stderr.splitlines() if ln.strip()][-1:] or ["no output"]
        raise SystemExit(f"error: {framework} at P={P} failed (exit {r.returncode}): {last[0].strip()}")
    return json.loads(lines[-1])


@entry_point
def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="python -m dpcnn.scaling", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="examples:\n  python -m dpcnn.scaling --ranks 1,2,4,8,16\n"
                       "  python -m dpcnn.scaling --ranks 1,2 --no-torch --json")
    ap.add_argument("--ranks", type=int_list, default=(1, 2), help="comma-separated rank counts (default 1,2)")
    ap.add_argument("--per-rank-batch", type=positive_int, default=32, help="images per rank per step (default 32)")
    ap.add_argument("--exact", action="store_true", help="dpcnn's --exact step (micro-batches, exact sums)")
    ap.add_argument("--no-gather", action="store_true",
                    help="with --exact: every gradient a grid sum in the one Allreduce, fc1's too (the exact "
                         "step before gathered factors), for comparison")
    ap.add_argument("--overlap", action="store_true",
                    help="reduce the dense layers' gradient during the conv backward (TrainStep overlap)")
    ap.add_argument("--no-barrier", action="store_true",
                    help="no barrier before the allreduce: 'xfer' then includes waiting for the slowest rank")
    ap.add_argument("--micro-batch", type=positive_int, default=Config.micro_batch,
                    help=f"with --exact: dpcnn's micro-batch, as in training (default {Config.micro_batch})")
    ap.add_argument("--steps", type=positive_int, default=200, help="timed steps (default 200)")
    ap.add_argument("--warmup", type=nonneg_int, default=20, help="untimed steps first (default 20)")
    ap.add_argument("--repeat", type=positive_int, default=3,
                    help="launches per P and framework, alternating; the median is reported (default 3)")
    ap.add_argument("--no-torch", action="store_true", help="skip PyTorch DDP even if installed")
    ap.add_argument("--json", action="store_true", help="print one JSON object per measurement")
    ap.add_argument("--save", type=Path, metavar="FILE", help="also append the JSON objects to FILE")
    ap.add_argument("--timeout", type=positive_float, default=600, help="seconds allowed per launch (default 600)")
    ap.add_argument("--bind-to", choices=("none", "core"), default="none",
                    help="pin each rank to a core (mpiexec -bind-to core, MPICH hydra); default none")
    ap.add_argument("--mpiexec-args", default="", metavar="ARGS",
                    help="more mpiexec options, e.g. across nodes: \"-launcher ssh -launcher-exec "
                         "scripts/cluster/netns-ssh -iface dpcnn-br -hosts nodeA,nodeB -ppn 1\"")
    ap.add_argument("--worker", choices=("dpcnn", "torch"), help=argparse.SUPPRESS)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_worker(args) if args.worker else measure(args)


def run_worker(args: argparse.Namespace) -> int:
    """One rank of a launched measurement: print its JSON result (rank 0)."""
    comm = get_comm("mpi") if args.worker == "dpcnn" else None
    try:
        if comm is not None:
            res = worker_dpcnn(comm, args.per_rank_batch, args.steps, args.warmup, args.micro_batch, args.exact,
                               args.overlap, not args.no_barrier, not args.no_gather)
        else:
            res = worker_torch(args.per_rank_batch, args.steps, args.warmup)
    except BaseException:                   # end the launch now rather than leave ranks waiting
        traceback.print_exc()
        sys.stderr.flush()
        if comm is not None:
            comm.abort(1)
        os._exit(1)
    if res:
        print(json.dumps(res), flush=True)
    return 0


def measure(args: argparse.Namespace) -> int:
    """Launch dpcnn (and DDP) on each rank count, alternating, and print the medians."""
    ranks = args.ranks
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if max(ranks) > cores:
        print(f"warning: P = {max(ranks)} ranks on {cores} usable cores: oversubscribed, the figures for "
              f"P > {cores} measure time-sharing, not scaling", file=sys.stderr)
    try:
        import torch  # noqa: F401
        use_torch = not args.no_torch
    except ImportError:
        use_torch = False
    base = None
    if not args.json:
        buf = StepBuffer(ModelSpec().num_params, np.float64 if args.exact else np.float32)
        mode = f"--exact, micro-batches of {args.micro_batch}" if args.exact else "float32 sums"
        mode += ", overlapped" if args.overlap else ""
        print(f"per-rank batch {args.per_rank_batch} ({mode}), 1 thread per rank, {args.steps} steps, median of "
              f"{args.repeat} launch(es), bind-to {args.bind_to}; allreduce of {buf.array.nbytes / 1e3:.0f} KB a step"
              + (" (or, at global batches up to 110, a gather of fc1's factors: allreduce_bytes in --json)"
                 if args.exact else ""))
        print(f"{'P':>3} {'img/s':>9} {'eff':>6} {'ms/step':>8} {'compute':>8} {'p99':>6} {'imbal':>6} "
              f"{'wait':>7} {'xfer':>7} {'dense':>6}"
              + (f" {'DDP img/s':>10} {'ratio':>6}" if use_torch else ""))
    for P in ranks:
        runs, truns = [], []
        for _ in range(args.repeat):          # alternate, so both frameworks see the same noise
            runs.append(launch("dpcnn", P, args))
            if use_torch:
                truns.append(launch("torch", P, args))
        r, t = median_run(runs), median_run(truns)
        assert r is not None                  # --repeat >= 1
        base = base or (r["images_per_second"] if P == 1 else None)
        if base:
            r["efficiency"] = efficiency(r["images_per_second"], P, base)
        if t:
            r["torch_ddp_images_per_second"] = t["images_per_second"]
            r["ratio_vs_torch_ddp"] = round(r["images_per_second"] / t["images_per_second"], 3)
        if args.save:
            with open(args.save, "a") as f:
                f.write(json.dumps({**r, "bind_to": args.bind_to}) + "\n")
        if args.json:
            print(json.dumps(r), flush=True)
        else:
            eff = f"{100 * r['efficiency']:5.1f}%" if "efficiency" in r else "     -"
            line = (f"{P:>3} {r['images_per_second']:>9.0f} {eff} {r['ms_per_step']:>8.2f} "
                    f"{r['compute_ms']:>8.2f} {r['compute_p99_ms']:>6.2f} {r['imbalance_ms']:>6.2f} "
                    f"{r['allreduce_wait_ms']:>7.2f} {r['allreduce_transfer_ms']:>7.2f} {r['dense_wait_ms']:>6.2f}")
            if t:
                line += f" {t['images_per_second']:>10.0f} {r['ratio_vs_torch_ddp']:>6.2f}"
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
