"""Measure how well, and how fast, dpcnn learns MNIST: initialisations, PyTorch, augmentation.

    python scripts/accuracy.py                          # everything below, about 15-25 min on 2 cores
    python scripts/accuracy.py --phases init,torch --seeds 0 --out runs/accuracy-quick
    python scripts/accuracy.py --summarise-only         # the tables again from the runs in --out

To measure one commit while the working tree changes, run it from an export of that commit:
``git archive HEAD | tar -x -C /tmp/m && cd /tmp/m && python scripts/accuracy.py --data
$PWD/data/mnist.h5 --out $PWD/runs/accuracy`` (from the checkout, with its virtualenv active).

Runs, one after another (never two at once), each in a fresh directory under --out:

* init:  ``mpiexec -n 2 python -m dpcnn.train --epochs 8 --val-size 5000 --init I --seed S``
  for every --inits I and --seeds S (the default recipe otherwise);
* torch: ``scripts/torch_reference.py`` (the same recipe, data and sample order in PyTorch,
  2 threads), right after each seed's dpcnn runs, so both see the same machine;
* aug:   the default recipe with ``--aug-flags`` (default ``--shift 2``) for each of ``--aug-epochs``;
* time:  ``--time-rounds`` more pairs of the default recipe (seed 0) and the reference, alternating,
  for the time to 99.0% on a busy machine (the medians are what to compare).

``uptime`` is recorded before and after each phase. The summary (``summary.md`` and
``summary.json`` in --out) has per init the test accuracy after each epoch as the mean over
the seeds and its range, the wall time to 99.0% test accuracy (dpcnn's ``elapsed_seconds`` and
the reference's, both counted from before the data is read; and each command's whole wall
time), the validation and test accuracy per epoch of the default run, and the test accuracy
of best.h5, the epoch chosen by validation accuracy.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.99


def run(cmd: list[str], log: Path) -> float:
    """Run cmd with its output in log; its wall time in seconds. Stops the script if it fails."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if r.returncode:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}; see {log}")
    return round(time.perf_counter() - t0, 2)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def records(path: Path) -> list[dict]:
    """The per-epoch records of a run (dpcnn: the epoch-end lines of metrics.jsonl)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if float(r["epoch"]).is_integer()]


def first_at(rows: list[dict], target: float = TARGET) -> tuple[int, float] | None:
    """(epoch, elapsed seconds) of the first epoch at >= target test accuracy, or None."""
    for r in rows:
        if r["test_accuracy"] >= target:
            return int(r["epoch"]), r["elapsed_seconds"]
    return None


def pct(values: list[float]) -> str:
    """'99.12 (99.05-99.20)': the mean and range, in percent."""
    v = [100 * x for x in values]
    if len(v) == 1:
        return f"{v[0]:.2f}"
    return f"{statistics.mean(v):.2f} ({min(v):.2f}-{max(v):.2f})"


def per_epoch(runs: list[list[dict]], key: str) -> list[str]:
    n = min(len(r) for r in runs)
    return [pct([r[e][key] for r in runs]) for e in range(n)]


def time_line(runs: list[list[dict]], walls: list[float]) -> str:
    hits = [first_at(r) for r in runs]
    got = [h for h in hits if h]
    each = ", ".join(f"epoch {h[0]} {h[1]:.1f} s" if h else "not reached" for h in hits)
    mid = f"median {statistics.median(h[1] for h in got):.1f} s" if len(got) == len(hits) else \
        f"{len(got)} of {len(hits)} reached it"
    return f"{mid} ({each}); whole command median {statistics.median(walls):.1f} s"


def best_by_val(rows: list[dict]) -> dict:
    """The record best.h5 holds: the first epoch of highest validation accuracy."""
    return max(rows, key=lambda r: (r["val_accuracy"], -r["epoch"]))


def summarise(out: Path, a: argparse.Namespace) -> str:
    meta = json.loads((out / "runs.json").read_text())
    lines = [f"# dpcnn accuracy measurements ({out})", "", "Load (`uptime`):", ""]
    lines += [f"    {when}: {u}" for when, u in meta["uptime"]]
    groups: dict[str, list] = {}
    for r in meta["runs"]:
        rows = records(out / r["name"] / "metrics.jsonl")
        groups.setdefault(r["group"], []).append((r, rows))
    summary: dict[str, dict] = {}
    for group, items in groups.items():
        runs, walls = [rows for _, rows in items], [r["wall_s"] for r, _ in items]
        best = [best_by_val(rows) for rows in runs if rows[0]["val_accuracy"] is not None]
        summary[group] = {"seeds": [r["seed"] for r, _ in items], "command": items[0][0]["cmd"],
                          "test_accuracy": per_epoch(runs, "test_accuracy"),
                          "val_accuracy": per_epoch(runs, "val_accuracy") if best else None,
                          "time_to_99": time_line(runs, walls),
                          "best_by_val": [f"epoch {b['epoch']:g}: val {100 * b['val_accuracy']:.2f}%, "
                                          f"test {100 * b['test_accuracy']:.2f}%" for b in best],
                          "best_by_val_test": pct([b["test_accuracy"] for b in best]) if best else None}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    width = max(len(s["test_accuracy"]) for s in summary.values())
    lines += ["", "## Test accuracy (%) after each epoch: mean over the seeds (min-max)", "",
              "| run | " + " | ".join(f"epoch {e + 1}" for e in range(width)) + " |",
              "| --- |" + " --- |" * width]
    for group, s in summary.items():
        cells = s["test_accuracy"] + [""] * (width - len(s["test_accuracy"]))
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    lines += ["", "## Time to 99.0% test accuracy (from before the data is read)", ""]
    lines += [f"* {group}: {s['time_to_99']}" for group, s in summary.items()]
    lines += ["", "## best.h5 (the epoch of highest validation accuracy): its test accuracy", ""]
    lines += [f"* {group}: {s['best_by_val_test']}; " + "; ".join(s["best_by_val"])
              for group, s in summary.items() if s["best_by_val"]]
    for group, s in summary.items():
        if s["val_accuracy"]:
            lines += ["", f"## {group}: validation and test accuracy (%) per epoch", "",
                      "| epoch | validation | test |", "| --- | --- | --- |"]
            lines += [f"| {e + 1} | {v} | {t} |" for e, (v, t) in enumerate(zip(s["val_accuracy"],
                                                                              s["test_accuracy"], strict=True))]
    lines += ["", "## Commands", ""] + [f"    {group}: {s['command']}" for group, s in summary.items()]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/mnist.h5")
    p.add_argument("--out", type=Path, default=Path("runs/accuracy"))
    p.add_argument("--phases", default="init,torch,aug", help="which of init,torch,aug,time to run")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--inits", default="he,torch,glorot")
    p.add_argument("--aug-init", default=None, help="--init of the augmented runs (default: dpcnn's default)")
    p.add_argument("--aug-epochs", default="8,16", help="run lengths of the augmented runs (default 8,16)")
    p.add_argument("--aug-flags", default="--shift 2", help="the augmentation flags (default --shift 2)")
    p.add_argument("--time-rounds", type=int, default=3, help="pairs run by the time phase (default 3)")
    p.add_argument("--mpiexec", default=shutil.which("mpiexec") or "mpiexec")
    p.add_argument("--summarise-only", action="store_true")
    a = p.parse_args(argv)
    out = (ROOT / a.out) if not a.out.is_absolute() else a.out
    if a.summarise_only:
        print(summarise(out, a))
        return
    phases, seeds = a.phases.split(","), [int(s) for s in a.seeds.split(",")]
    out.mkdir(parents=True, exist_ok=True)
    # runs of earlier invocations in --out stay in the summary; a run done again replaces its entry
    old = json.loads((out / "runs.json").read_text()) if (out / "runs.json").exists() else {}
    meta: dict = {"uptime": old.get("uptime", []) + [("start " + a.phases, uptime())], "runs": old.get("runs", [])}
    py = sys.executable
    dpcnn = [a.mpiexec, "-n", "2", py, "-m", "dpcnn.train", "--data", a.data, "--threads", "1", "--no-progress",
             "-q", "--val-size", "5000"]

    def one(group: str, name: str, seed: int, cmd: list[str], run_dir: Path) -> None:
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        wall = run(cmd, run_dir / "output.log")
        meta["runs"] = [r for r in meta["runs"] if r["name"] != name]
        meta["runs"].append({"group": group, "name": name, "seed": seed, "wall_s": wall,
                             "cmd": " ".join(cmd).replace(py, "python")})
        rows = records(run_dir / "metrics.jsonl")
        print(f"{name}: test {100 * rows[-1]['test_accuracy']:.2f}% after {len(rows)} epochs, "
              f"first >= 99.0%: {first_at(rows)}, {wall:.1f} s", flush=True)
        (out / "runs.json").write_text(json.dumps(meta, indent=1) + "\n")

    for seed in seeds:
        if "init" in phases:
            for init in a.inits.split(","):
                name = f"init-{init}-s{seed}"
                one(f"dpcnn --init {init}", name, seed, dpcnn + ["--epochs", "8", "--init", init, "--seed", str(seed),
                                                                 "--out", str(out / name)], out / name)
        if "torch" in phases:
            name = f"torch-s{seed}"
            one("PyTorch reference", name, seed, [py, "scripts/torch_reference.py", "--data", a.data, "--epochs", "8",
                                                  "--seed", str(seed), "--threads", "2", "--out",
                                                  str(out / name / "metrics.jsonl")], out / name)
    if "init" in phases or "torch" in phases:
        meta["uptime"].append(("after init/torch", uptime()))
    if "aug" in phases:
        init = ["--init", a.aug_init] if a.aug_init else []
        for epochs in a.aug_epochs.split(","):
            for seed in seeds:
                name = f"aug-{''.join(a.aug_flags.replace('-', ' ').split())}-e{epochs}-s{seed}"
                one(f"dpcnn {a.aug_flags} {' '.join(init)}".strip() + f", {epochs} epochs", name, seed,
                    dpcnn + ["--epochs", epochs, *a.aug_flags.split(), *init, "--seed", str(seed),
                             "--out", str(out / name)], out / name)
        meta["uptime"].append(("after aug", uptime()))
    if "time" in phases:
        for i in range(a.time_rounds):
            one("timing: dpcnn (defaults)", f"time-dpcnn-r{i}", 0, dpcnn + ["--epochs", "8", "--seed", "0", "--out",
                                                                           str(out / f"time-dpcnn-r{i}")],
                out / f"time-dpcnn-r{i}")
            one("timing: PyTorch reference", f"time-torch-r{i}", 0,
                [py, "scripts/torch_reference.py", "--data", a.data, "--epochs", "8", "--seed", "0", "--threads", "2",
                 "--out", str(out / f"time-torch-r{i}" / "metrics.jsonl")], out / f"time-torch-r{i}")
        meta["uptime"].append(("after time", uptime()))
    (out / "runs.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(summarise(out, a))


if __name__ == "__main__":
    main()
