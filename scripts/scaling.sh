#!/usr/bin/env bash
# Measure a node: single-process ratio against PyTorch, then multi-rank scaling with PyTorch DDP
# beside it (median of REPEAT launches per point), then the same with each rank pinned to a core.
# Prints tables; with OUT set, also writes the JSON lines to $OUT/scaling.jsonl.
#   scripts/scaling.sh                    # ranks 1,2,4,8,16 if the node has 16 cores
#   RANKS=1,2,4 REPEAT=5 OUT=results scripts/scaling.sh
set -euo pipefail
cores=$(nproc)
RANKS=${RANKS:-$(python3 -c "print(','.join(str(p) for p in (1,2,4,8,16,32,64) if p <= $cores))")}
STEPS=${STEPS:-300}
REPEAT=${REPEAT:-3}
TIMEOUT=${TIMEOUT:-120}                   # seconds per launch: a hung launch fails, not the whole budget
save=()
if [[ -n ${OUT:-} ]]; then mkdir -p "$OUT"; save=(--save "$OUT/scaling.jsonl"); fi
echo "== $(hostname): $cores cores, $(python3 -c 'import platform; print(platform.processor() or platform.machine())')"
lscpu 2>/dev/null | grep -E "Model name|Thread\(s\) per core|Core\(s\) per socket|Socket\(s\)|L3" || true
echo "== single process, batch 64, 1 thread: dpcnn vs PyTorch"
python3 -m dpcnn.bench --batch-size 64 --threads 1 --rounds 7
python3 -m dpcnn.scaling --ranks 1 --steps 20 --repeat 1 --no-torch >/dev/null   # warm the node (first launch ran slow)
echo "== scaling, per-rank batch 32, 1 thread per rank"
python3 -m dpcnn.scaling --ranks "$RANKS" --per-rank-batch 32 --steps "$STEPS" --repeat "$REPEAT" \
    --timeout "$TIMEOUT" "${save[@]}"
echo "== the same with --exact (the same bits on any rank count)"
python3 -m dpcnn.scaling --ranks "$RANKS" --per-rank-batch 32 --steps "$STEPS" --repeat "$REPEAT" \
    --timeout "$TIMEOUT" --exact --no-torch "${save[@]}"
echo "== the same, each rank pinned to a core"
python3 -m dpcnn.scaling --ranks "$RANKS" --per-rank-batch 32 --steps "$STEPS" --repeat "$REPEAT" \
    --timeout "$TIMEOUT" --bind-to core --no-torch "${save[@]}"
