#!/usr/bin/env bash
# Training time of steps 51-150 with --snapshot-replicas 0 and 1: FSDP, two nodes on this host (two torchrun
# agents, one rank each, each node its own snapshot folder), the wide MLP (1024x1024, 34 MB of state), a
# snapshot every step. Alternating, REPEATS times each: what keeping each rank's snapshot on the other node costs.
#   bash bench/replicas.sh            # about 2 minutes here
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
REPEATS=${REPEATS:-3}
work=$(mktemp -d)
run() {  # $1: replicas, $2: tag
  local port=$((29700 + RANDOM % 200)) out="$work/$2"
  for node in 0 1; do
    PYTHON=$PY OMP_NUM_THREADS=1 bash launch/multinode.sh --head 127.0.0.1 --port "$port" --nnodes 2 --nproc 1 \
      --rdzv-id "r$2" -- --strategy fsdp --task-arg hidden=[1024,1024] samples=65536 --batch-size 64 --steps 150 \
      --log-every 10 --snapshot-every 1 --snapshot-replicas "$1" --snapshot-dir "$work/shm$node" --out "$out" \
      > "$work/$2.node$node.log" 2>&1 &
  done
  wait
  "$PY" -c "
import json
t = {r['step']: r['time'] for r in map(json.loads, open('$out/metrics.jsonl')) if r['kind'] == 'train'}
print(t[150] - t[50])"
}
ratios=()
for i in $(seq "$REPEATS"); do
  off=$(run 0 "a$i"); on=$(run 1 "b$i")
  ratios+=("$("$PY" -c "print($off / $on)")")
  printf 'repeat %s: steps 51-150 in %.3f s without replicas, %.3f s with: throughput %.3f of without\n' \
    "$i" "$off" "$on" "${ratios[-1]}"
done
"$PY" -c "import statistics, sys; print(f'median {statistics.median(map(float, sys.argv[1:])):.3f}')" "${ratios[@]}"
rm -rf "$work"
