#!/usr/bin/env bash
# Measure a node: single-process ratio against PyTorch, then multi-rank scaling with PyTorch DDP
# beside it. Prints tables and, with OUT set, writes the JSON lines to $OUT/.
#   scripts/scaling.sh                    # ranks 1,2,4,8,16 if the node has 16 cores
#   RANKS=1,2,4 OUT=results scripts/scaling.sh
set -euo pipefail
cores=$(nproc)
RANKS=${RANKS:-$(python3 -c "print(','.join(str(p) for p in (1,2,4,8,16,32,64) if p <= $cores))")}
STEPS=${STEPS:-200}
echo "== $(hostname): $cores cores, $(python3 -c 'import platform; print(platform.processor() or platform.machine())')"
lscpu 2>/dev/null | grep -E "Model name|Thread\(s\) per core|Core\(s\) per socket|Socket\(s\)|L3" || true
echo "== single process, batch 64, 1 thread: dpcnn vs PyTorch"
python3 -m dpcnn.bench --batch-size 64 --threads 1 --rounds 7
python3 -m dpcnn.scaling --ranks 1 --steps 20 --no-torch >/dev/null     # warm the node (first launch ran slow)
echo "== scaling, per-rank batch 32, 1 thread per rank"
python3 -m dpcnn.scaling --ranks "$RANKS" --per-rank-batch 32 --steps "$STEPS"
echo "== the same, each rank pinned to a core"
python3 -m dpcnn.scaling --ranks "$RANKS" --per-rank-batch 32 --steps "$STEPS" --bind-to core --no-torch
if [[ -n ${OUT:-} ]]; then
    mkdir -p "$OUT"
    python3 -m dpcnn.bench --batch-size 64 --threads 1 --json > "$OUT/bench.json"
    python3 -m dpcnn.scaling --ranks "$RANKS" --per-rank-batch 32 --steps "$STEPS" --json > "$OUT/scaling.jsonl"
fi
