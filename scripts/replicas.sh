#!/usr/bin/env bash
# `make replicas`: shapserve scaled out on one machine: two API replicas behind HAProxy
# (deploy/haproxy/haproxy.cfg, which polls each replica's /readyz), explanation workers, one Redis,
# one registry. tests/e2e/test_replicas.py runs the same layout with its faults.
#
#   scripts/replicas.sh          start everything; Ctrl-C stops everything it started
#
# The registry must already hold a promoted version (`make run` or `make train` make one).
# Settings (environment):
#   MODEL_REGISTRY      the registry every replica and worker reads (default ./models)
#   PORT                the balancer's port, where clients connect (default 8000)
#   API_PORTS           the two replicas' ports (default "8001 8002")
#   STATS_PORT          HAProxy's stats page, http://127.0.0.1:PORT/stats (default 8404)
#   WORKERS             explanation workers (default 2)
#   REDIS_URL           a Redis to use; unset: a redis-server of its own on REDIS_PORT (default
#                       6390) with its data (AOF) under VAR_DIR/redis
#   MODEL_WATCH_INTERVAL_S  how often each replica checks the promoted version (default 5)
#   VAR_DIR             logs and pid files (default var/replicas); VENV (default .venv)
# Every other variable (BATCH_*, EXPLAIN_*, API keys, ...) reaches the replicas and workers as it is.
#
# Try it: kill -9 "$(cat var/replicas/api1.pid)" under load (bench/load_predict.py, wrk): the
# balancer takes api1 out within about a second (stats page: DOWN) and retries what it lost.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
VAR_DIR=${VAR_DIR:-var/replicas}
export MODEL_REGISTRY=${MODEL_REGISTRY:-models}
export MODEL_WATCH_INTERVAL_S=${MODEL_WATCH_INTERVAL_S:-5}
PORT=${PORT:-8000}
read -r API1_PORT API2_PORT <<<"${API_PORTS:-8001 8002}"
STATS_PORT=${STATS_PORT:-8404}
WORKERS=${WORKERS:-2}
REDIS_PORT=${REDIS_PORT:-6390}
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)

say() { echo "[replicas] $*"; }
die() { echo "[replicas] error: $*" >&2; exit 2; }

[ -x "$PY" ] || die "no $PY: run \`make install\` first"
[ -x "$HAPROXY" ] || die "haproxy is not installed (Debian: apt-get install haproxy)"
case "$MODEL_REGISTRY" in
  *://*) ;;  # an object-store registry: the replicas say what they find
  *) [ -s "$MODEL_REGISTRY/PROMOTED" ] || die "$MODEL_REGISTRY has no promoted version (\`make run\` or \`make train\` makes one)" ;;
esac
mkdir -p "$VAR_DIR/log"

pids=()
names=()
stop_all() {
  trap - EXIT INT TERM
  say "stopping"
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -f "$VAR_DIR"/*.pid
}
trap stop_all EXIT
trap 'exit 130' INT TERM

# start NAME CMD...: in the background, output in VAR_DIR/log/NAME.log, pid in VAR_DIR/NAME.pid
start() {
  local name=$1; shift
  "$@" >"$VAR_DIR/log/$name.log" 2>&1 &
  pids+=("$!")
  names+=("$name")
  echo "$!" >"$VAR_DIR/$name.pid"
  say "$name: pid $! (log $VAR_DIR/log/$name.log)"
}

if [ -z "${REDIS_URL:-}" ]; then
  command -v redis-server >/dev/null || die "redis-server is not installed (or set REDIS_URL)"
  mkdir -p "$VAR_DIR/redis"
  start redis redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$VAR_DIR/redis" \
    --appendonly yes --appendfsync everysec --save ""
  export REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
fi
for i in $(seq 1 "$WORKERS"); do
  start "worker$i" "$PY" -m worker
done
HOST=127.0.0.1 PORT=$API1_PORT start api1 "$PY" -m service
HOST=127.0.0.1 PORT=$API2_PORT start api2 "$PY" -m service
SHAPSERVE_LB_BIND="127.0.0.1:$PORT" SHAPSERVE_LB_STATS="127.0.0.1:$STATS_PORT" \
  SHAPSERVE_API_1="127.0.0.1:$API1_PORT" SHAPSERVE_API_2="127.0.0.1:$API2_PORT" \
  start haproxy "$HAPROXY" -db -f deploy/haproxy/haproxy.cfg

# Until Ctrl-C: a process that exits is reported once, not restarted, and the rest go on (a dead
# replica is what the balancer routes around); only the balancer's own exit stops everything.
watch_processes() {
  local reported=" " i
  while true; do
    for i in "${!pids[@]}"; do
      if ! kill -0 "${pids[$i]}" 2>/dev/null && [[ $reported != *" $i "* ]]; then
        reported+="$i "
        [ "${names[$i]}" = haproxy ] && die "haproxy exited: see $VAR_DIR/log/haproxy.log"
        say "${names[$i]} (pid ${pids[$i]}) exited; the others go on (log: $VAR_DIR/log/${names[$i]}.log)"
      fi
    done
    sleep 1
  done
}

say "waiting for a replica to be ready behind the balancer"
for _ in $(seq 1 600); do
  for i in "${!pids[@]}"; do
    kill -0 "${pids[$i]}" 2>/dev/null || die "${names[$i]} exited while starting: see $VAR_DIR/log/${names[$i]}.log"
  done
  if curl -fs -o /dev/null "http://127.0.0.1:$PORT/readyz"; then
    say "API: http://127.0.0.1:$PORT/ (replicas on $API1_PORT and $API2_PORT)"
    say "balancer's stats: http://127.0.0.1:$STATS_PORT/stats; Ctrl-C stops everything"
    watch_processes
  fi
  sleep 1
done
die "no replica was ready after 600 s: see $VAR_DIR/log/"
