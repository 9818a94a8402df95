#!/usr/bin/env bash
# `make run`: create the venv if needed (scripts/install.sh), then start Redis (unless one
# answers), a model (trained first when the registry is empty), the workers and the API.
# Ctrl-C stops everything it started. `scripts/run.sh train`: train + evaluate + promote.
# Settings: environment variables, listed by `scripts/run.sh help` (e.g. PORT=8080,
# DATA=../shared/data/cifar10/train.tar.gz, TRAIN_MINUTES=5, WORKERS=2, REDIS_URL=...).
set -euo pipefail
export SHAPSERVE_CALLER_CWD="${SHAPSERVE_CALLER_CWD:-$PWD}"
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  scripts/install.sh
fi
exec "$VENV/bin/python" scripts/run.py "$@"
