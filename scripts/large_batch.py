"""Measure learning at scale and with elastic distortions; model the time to 99.2% on P ranks.

    python scripts/large_batch.py --phases batch        # global batches 16-4,096, with and without --large-batch
    python scripts/large_batch.py --phases elastic      # --elastic 34 --elastic-sigma 6 over 3 seeds
    python scripts/large_batch.py --phases paper        # bench + allreduce times -> the table for P = 1..256
    python scripts/large_batch.py --summarise-only      # the tables again from the runs in --out

Not part of CI: the batch phase takes about 40 minutes on 2 cores, the elastic phase longer. Runs go
one after another (never two at once), each in a fresh directory under --out (runs/large-batch):

* batch: ``mpiexec -n 2 python -m dpcnn.train --exact --batch-size B --seed S --epochs 8`` for every
  --batches B and --seeds S, without and with ``--large-batch``; with ``--exact`` a 2-rank run at
  global batch B computes exactly what B/16 ranks of 16 would. Each of --long-batches also runs the
  recipe for --long-epochs (16). Epochs to 99.2% test accuracy: the first epoch-end at or above it.
* elastic: ``mpiexec -n 2 python -m dpcnn.train --epochs E --seed S`` with --elastic-flags (and the
  --elastic-model flags, if given) for each of --elastic-epochs; best.h5 is chosen by validation.
* paper: ``python -m dpcnn.bench --batch-size 16 --no-torch --clock cpu --json`` (the compute of one
  micro-batch of 16, a rank's share at per-rank batch 16), ``python -m dpcnn.scaling --ranks 2
  --per-rank-batch 16 --exact --no-torch --json`` (the allreduce of the exact step's buffer between 2
  ranks) and a 1-value allreduce (the latency); then, for P = 1, 4, 16, 64, 256 ranks of 16, the step
  time of the ring-allreduce model, 2 (P - 1) / P * bytes / bandwidth + 2 (P - 1) * latency, on top
  of the compute, with this machine's measured latency and bandwidth, and with the two-node (TCP)
  figure of the README, times the steps to 99.2% that the batch phase measured at B = 16P.

``uptime`` is recorded before and after each phase; ``summary.md`` and ``summary.json`` in --out hold
the tables.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from accuracy import pct, records, run, uptime

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.992
TRAIN_SAMPLES = 55_000                      # MNIST's 60,000 less the 5,000 held out for validation
RANKS = (1, 4, 16, 64, 256)
PER_RANK = 16
# The two-node cluster of the README (network namespaces joined by a bridge, MPI over TCP, 2 ranks):
# the allreduce of the exact step's buffer took 3.1 ms a step; its latency was not measured: assumed.
TCP_ALLREDUCE_MS, TCP_LATENCY_US = 3.1, 50.0

LATENCY_PROBE = """
import time, numpy as np
from mpi4py import MPI
c = MPI.COMM_WORLD
x = np.zeros(1)
t = []
for i in range(3000):
    c.Barrier()
    t0 = time.perf_counter()
    c.Allreduce(MPI.IN_PLACE, x)
    t.append(time.perf_counter() - t0)
if c.rank == 0:
    print(1e6 * float(np.median(t[500:])))
"""


def epochs_to(rows: list[dict], target: float = TARGET) -> int | None:
    """The first epoch whose end reached target test accuracy, or None."""
    return next((int(r["epoch"]) for r in rows if r["test_accuracy"] >= target), None)


def reach(hits: list[int | None]) -> str:
    """'3.3 (3, 3, 4)', or '2 of 3 (5, -, 6)' when some seeds never reached it."""
    each = ", ".join("-" if h is None else str(h) for h in hits)
    got = [h for h in hits if h is not None]
    if len(got) < len(hits):
        return f"{len(got)} of {len(hits)} ({each})"
    return f"{statistics.mean(got):.1f} ({each})"


def short(cmd: str) -> str:
    """A run's command as the tables show it: the trainer's flags that vary, the seed as S."""
    flags = cmd.split(" --resume none ", 1)[-1].split(" --out ")[0]
    return "python -m dpcnn.train " + flags.replace(" --seed 0", " --seed S").replace(" --seed 1", " --seed S") \
        .replace(" --seed 2", " --seed S")


def ring_ms(P: int, nbytes: int, bandwidth: float, latency_s: float) -> float:
    """The ring allreduce's time in ms: 2 (P - 1) / P * bytes / bandwidth + 2 (P - 1) * latency."""
    return 1e3 * (2 * (P - 1) / P * nbytes / bandwidth + 2 * (P - 1) * latency_s)


def batch_table(out: Path, meta: dict) -> tuple[list[str], dict]:
    groups: dict[tuple, list] = {}
    for r in meta["runs"]:
        if r["group"].startswith("batch"):
            rows = records(out / r["name"] / "metrics.jsonl")
            groups.setdefault((r["batch"], r["recipe"], r["epochs"]), []).append((r, rows))
    table = {}
    lines = ["| global batch (ranks of 16) | recipe | epochs | test accuracy at the end | epochs to 99.2% (each seed) |"
             " command |", "| --- | --- | --- | --- | --- | --- |"]
    for (B, recipe, epochs), items in sorted(groups.items(), key=lambda g: (g[0][0], g[0][1] != "plain", g[0][2])):
        runs = [rows for _, rows in items]
        hits = [epochs_to(rows) for rows in runs]
        final = [rows[-1]["test_accuracy"] for rows in runs]
        table[f"{B}/{recipe}/{epochs}"] = {"batch": B, "recipe": recipe, "epochs": epochs, "hits": hits,
                                          "final": final, "seeds": [r["seed"] for r, _ in items]}
        lines.append(f"| {B} ({B // PER_RANK}) | {recipe} | {epochs} | {pct(final)} | {reach(hits)} | "
                     f"`{short(items[0][0]['cmd'])}` |")
    return lines, table


def paper_table(meta: dict, table: dict) -> tuple[list[str], dict]:
    p = meta.get("paper")
    if not p:
        return [], {}
    t_c = p["compute_ms"]
    nbytes, t_x, lat = p["allreduce_bytes"], p["allreduce_ms"], p["latency_us"] * 1e-6
    local_bw = nbytes / max(t_x * 1e-3 - 2 * lat, 1e-9)
    tcp_lat = TCP_LATENCY_US * 1e-6
    tcp_bw = nbytes / (TCP_ALLREDUCE_MS * 1e-3 - 2 * tcp_lat)
    lines = [f"Compute of one micro-batch of 16 (forward, backward, exact sums, update; bench, CPU clock): "
             f"**{t_c:.2f} ms** (measured). Allreduce of the exact step's {nbytes / 1e3:.0f} KB buffer between 2 "
             f"ranks here: **{t_x:.2f} ms** (measured; latency of a 1-value allreduce {p['latency_us']:.1f} us, "
             f"measured), so a bandwidth of {local_bw / 1e9:.2f} GB/s in the ring model; two nodes over TCP "
             f"(README): {TCP_ALLREDUCE_MS} ms (measured), with {TCP_LATENCY_US:.0f} us latency (assumed): "
             f"{tcp_bw / 1e9:.2f} GB/s.", "",
             "| P | global batch | epochs to 99.2% (measured) | steps | allreduce ms: shared memory / TCP "
             "(modelled) | step ms: shared memory / TCP (modelled) | time to 99.2%: shared memory / TCP (modelled) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    out = {}
    for P in RANKS:
        B = PER_RANK * P
        measured = [v for v in table.values() if v["batch"] == B and all(h is not None for h in v["hits"])]
        if not measured:
            lines.append(f"| {P} | {B} | not measured or not reached | | | | |")
            continue
        best = min(measured, key=lambda v: (statistics.mean(v["hits"]), v["epochs"]))
        ep = statistics.mean(best["hits"])
        steps = ep * (TRAIN_SAMPLES // B)
        ar = [0.0 if P == 1 else ring_ms(P, nbytes, bw, la) for bw, la in ((local_bw, lat), (tcp_bw, tcp_lat))]
        step = [t_c + a for a in ar]
        secs = [steps * s * 1e-3 for s in step]
        out[P] = {"batch": B, "epochs": ep, "recipe": best["recipe"], "steps": steps, "allreduce_ms": ar,
                  "step_ms": step, "seconds": secs}
        lines.append(f"| {P} | {B} | {ep:.1f} ({best['recipe']}) | {steps:,.0f} | {ar[0]:.2f} / {ar[1]:.2f} | "
                     f"{step[0]:.2f} / {step[1]:.2f} | {secs[0]:.1f} s / {secs[1]:.1f} s |")
    return lines, out


def elastic_table(out: Path, meta: dict) -> tuple[list[str], dict]:
    groups: dict[str, list] = {}
    for r in meta["runs"]:
        if r["group"].startswith("elastic"):
            groups.setdefault(r["group"], []).append((r, records(out / r["name"] / "metrics.jsonl")))
    lines = ["| run | epochs | test accuracy at the end | best.h5 (by validation): test accuracy | each seed |"
             " wall s (median) |", "| --- | --- | --- | --- | --- | --- |"]
    summary = {}
    for group, items in groups.items():
        runs = [rows for _, rows in items]
        final = [rows[-1]["test_accuracy"] for rows in runs]
        best = [max(rows, key=lambda r: (r["val_accuracy"], -r["epoch"]))["test_accuracy"] for rows in runs]
        summary[group] = {"final": final, "best_by_val": best, "seeds": [r["seed"] for r, _ in items]}
        each = ", ".join(f"{100 * f:.2f}" for f in final)
        wall = statistics.median(r["wall_s"] for r, _ in items)
        lines.append(f"| `{short(items[0][0]['cmd'])}` | {len(runs[0])} | {pct(final)} | {pct(best)} | {each} | "
                     f"{wall:.0f} |")
    return lines, summary


def summarise(out: Path) -> str:
    meta = json.loads((out / "runs.json").read_text())
    lines = [f"# dpcnn at scale ({out})", "", "Load (`uptime`):", ""]
    lines += [f"    {when}: {u}" for when, u in meta["uptime"]]
    batch_lines, table = batch_table(out, meta)
    paper_lines, paper = paper_table(meta, table)
    elastic_lines, elastic = elastic_table(out, meta)
    lines += ["", "## Accuracy per global batch (test accuracy %, mean over the seeds (min-max))", ""] + batch_lines
    lines += ["", "## Time to 99.2% against the number of ranks (per-rank batch 16)", ""] + paper_lines
    lines += ["", "## Elastic distortions", ""] + elastic_lines
    (out / "summary.json").write_text(json.dumps({"batch": table, "paper": paper, "elastic": elastic}, indent=1) + "\n")
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def measure_paper(a: argparse.Namespace, py: str) -> dict:
    """Compute, allreduce and latency, measured on this machine (see the module docstring)."""
    def last_json(cmd: list[str]) -> dict:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800, check=True)
        return json.loads(r.stdout.strip().splitlines()[-1])

    bench = last_json([py, "-m", "dpcnn.bench", "--batch-size", "16", "--no-torch", "--clock", "cpu",
                       "--rounds", "9", "--json"])
    scaling = last_json([py, "-m", "dpcnn.scaling", "--ranks", "2", "--per-rank-batch", "16", "--exact",
                         "--no-torch", "--json", "--repeat", "3"])
    probe = subprocess.run([a.mpiexec, "-n", "2", py, "-c", LATENCY_PROBE], capture_output=True, text=True,
                           cwd=ROOT, timeout=600, check=True)
    return {"compute_ms": bench["exact_ms_per_step"], "allreduce_ms": scaling["allreduce_transfer_ms"],
            "allreduce_wait_ms": scaling["allreduce_wait_ms"], "allreduce_bytes": scaling["allreduce_bytes"],
            "latency_us": float(probe.stdout.strip().splitlines()[-1]), "bench": bench, "scaling": scaling}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/mnist.h5")
    p.add_argument("--out", type=Path, default=Path("runs/large-batch"))
    p.add_argument("--phases", default="batch,paper", help="which of batch,elastic,paper to run")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--batches", default="16,64,256,1024,4096", help="global batches of the batch phase")
    p.add_argument("--recipes", default="plain,large-batch", help="plain (the defaults) and/or large-batch")
    p.add_argument("--long-batches", default="4096", help="batches whose recipe also runs --long-epochs")
    p.add_argument("--long-epochs", default="16")
    p.add_argument("--elastic-flags", default="--elastic 34 --elastic-sigma 6")
    p.add_argument("--elastic-model", default="", help="model flags of the elastic runs, e.g. '--channels 16,32'")
    p.add_argument("--elastic-epochs", default="40", help="run lengths of the elastic runs")
    p.add_argument("--mpiexec", default=shutil.which("mpiexec") or "mpiexec")
    p.add_argument("--summarise-only", action="store_true")
    a = p.parse_args(argv)
    out = (ROOT / a.out) if not a.out.is_absolute() else a.out
    if a.summarise_only:
        print(summarise(out))
        return
    phases, seeds = a.phases.split(","), [int(s) for s in a.seeds.split(",")]
    out.mkdir(parents=True, exist_ok=True)
    # runs of earlier invocations in --out stay in the summary; a run done again replaces its entry
    old = json.loads((out / "runs.json").read_text()) if (out / "runs.json").exists() else {}
    meta: dict = {**old, "uptime": old.get("uptime", []) + [("start " + a.phases, uptime())],
                  "runs": old.get("runs", [])}
    py = sys.executable
    dpcnn = [a.mpiexec, "-n", "2", py, "-m", "dpcnn.train", "--data", a.data, "--threads", "1", "--no-progress",
             "-q", "--val-size", "5000", "--resume", "none"]

    def one(group: str, name: str, seed: int, flags: list[str], **about) -> None:
        run_dir = out / name
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        cmd = dpcnn + flags + ["--seed", str(seed), "--out", str(run_dir)]
        wall = run(cmd, run_dir / "output.log")
        meta["runs"] = [r for r in meta["runs"] if r["name"] != name]
        meta["runs"].append({"group": group, "name": name, "seed": seed, "wall_s": wall, **about,
                             "cmd": " ".join(cmd).replace(py, "python").replace(str(out) + "/", "")})
        rows = records(run_dir / "metrics.jsonl")
        print(f"{name}: test {100 * rows[-1]['test_accuracy']:.2f}% after {len(rows)} epochs, first >= 99.2%: "
              f"{epochs_to(rows)}, {wall:.1f} s", flush=True)
        (out / "runs.json").write_text(json.dumps(meta, indent=1) + "\n")

    if "batch" in phases:
        for B in a.batches.split(","):
            for recipe in a.recipes.split(","):
                lengths = ["8"] + ([a.long_epochs] if recipe != "plain" and B in a.long_batches.split(",") else [])
                for epochs in lengths:
                    for seed in seeds:
                        flags = ["--exact", "--batch-size", B, "--epochs", epochs]
                        flags += ["--large-batch"] if recipe != "plain" else []
                        one(f"batch {B} {recipe}", f"batch{B}-{recipe}-e{epochs}-s{seed}", seed, flags,
                            batch=int(B), recipe=recipe, epochs=int(epochs))
        meta["uptime"].append(("after batch", uptime()))
    if "elastic" in phases:
        for epochs in a.elastic_epochs.split(","):
            for seed in seeds:
                flags = ["--epochs", epochs, *a.elastic_flags.split(), *a.elastic_model.split()]
                tag = "".join((a.elastic_flags + a.elastic_model).replace("-", " ").replace(",", "_").split())
                one(f"elastic {a.elastic_flags} {a.elastic_model} {epochs}", f"elastic-{tag}-e{epochs}-s{seed}",
                    seed, flags, epochs=int(epochs))
        meta["uptime"].append(("after elastic", uptime()))
    if "paper" in phases:
        meta["paper"] = measure_paper(a, py)
        meta["uptime"].append(("after paper", uptime()))
    (out / "runs.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(summarise(out))


if __name__ == "__main__":
    main()
