#!/usr/bin/env bash
# Real `cpu`-profile runs on the shared training images at 5, 15 and 60-minute budgets,
# each scored on the 20% validation split it held out. Not for CI (80+ minutes).
# Usage: [TRAIN_ARGS='--lr 0.05'] bench/train_budgets.sh [DATA] [REGISTRY] [BUDGETS...]
set -euo pipefail
DATA=${1:-../shared/data/cifar10/train.tar.gz}
REG=${2:-models}
shift 2 || true
BUDGETS=${*:-5 15 60}
PY=${PYTHON:-.venv/bin/python}
for b in $BUDGETS; do
  echo "=== cpu profile, budget $b min, $(date -u +%FT%TZ) ==="
  start=$(date +%s)
  # the run's output goes to stdout as it comes; its last line is the version id
  out=$(mktemp)
  $PY -m training --quiet --registry "$REG" train --data "$DATA" --profile cpu --weights none --time-budget "$b" ${TRAIN_ARGS:-} | tee "$out"
  v=$(tail -1 "$out")
  rm -f "$out"
  echo "wall seconds: $(( $(date +%s) - start ))"
  $PY -m training --quiet --registry "$REG" evaluate --version "$v" --data "$DATA" --holdout
done
