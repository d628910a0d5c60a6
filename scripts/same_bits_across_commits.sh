#!/usr/bin/env bash
# Does a refactor change any bit? Train the same 2-epoch MNIST runs on two commits (1 and 2 ranks,
# float and exact sums) and compare the final parameters, momentum and records (timings aside).
#
#   scripts/same_bits_across_commits.sh OLD_COMMIT [NEW_COMMIT=HEAD] [EPOCHS=2]
#
# Needs the project's venv active (mpiexec, numpy, h5py) and data/mnist.h5; about 4 minutes a
# commit on 2 cores. Worktrees and runs go to a temporary directory, removed at the end.
set -euo pipefail
OLD=${1:?usage: $0 OLD_COMMIT [NEW_COMMIT] [EPOCHS]}; NEW=${2:-HEAD}; EPOCHS=${3:-2}
ROOT=$(cd "$(dirname "$0")/.." && pwd); DATA=$ROOT/data/mnist.h5
W=$(mktemp -d); trap 'git -C "$ROOT" worktree remove --force "$W/old" >/dev/null 2>&1 || true;
                      git -C "$ROOT" worktree remove --force "$W/new" >/dev/null 2>&1 || true; rm -rf "$W"' EXIT
git -C "$ROOT" worktree add -q "$W/old" "$OLD"; git -C "$ROOT" worktree add -q "$W/new" "$NEW"
for v in old new; do
  for sums in --no-exact --exact; do
    for n in 1 2; do
      (cd "$W/$v" && PYTHONPATH="$W/$v" OMP_NUM_THREADS=1 timeout 1800 mpiexec -n $n python -m dpcnn.train \
         --data "$DATA" --epochs "$EPOCHS" $sums --out "$W/runs/$v$sums-$n" --threads 1 --no-progress -q)
    done
  done
done
PYTHONPATH="$W/new" python - "$W/runs" <<'PY'
import json, sys
from pathlib import Path
import numpy as np
from dpcnn import checkpoint as ckpt
from dpcnn.rundir import RunDir
TIMINGS = {"images_per_second", "elapsed_seconds", "time_data_s", "time_compute_s", "time_allreduce_s",
           "time_update_s", "time_eval_s"}
runs, ok = Path(sys.argv[1]), True
def records(d):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in (d / "metrics.jsonl").open()]
for sums in ("--no-exact", "--exact"):
    for n in (1, 2):
        o, w = runs / f"old{sums}-{n}", runs / f"new{sums}-{n}"
        a, b = (ckpt.load(RunDir(d).checkpoints()[0]) for d in (o, w))
        same = {"params": all(np.array_equal(a.params[k], b.params[k]) for k in a.params),
                "momentum": all(np.array_equal(a.velocity[k], b.velocity[k]) for k in a.velocity),
                "records": records(o) == records(w)}
        ok &= all(same.values())
        print(f"{sums:10s} {n} rank(s), step {b.step}: " + ", ".join(f"{k} {'same' if v else 'DIFFER'}" for k, v in same.items()))
sys.exit(0 if ok else 1)
PY
