#!/usr/bin/env bash
# Two commits side by side, same machine, same sitting, same clients: POST /predict at 16
# connections (wrk, closed loop, 20 s after a 3 s warm-up) and default explanations over HTTP
# (bench/explain_http.py: samples 5000, 50 segments, one after the other), each tree's own
# `python -m service` and `python -m worker` on the same registry. Prints a markdown table.
#
#   bench/before_after.sh REGISTRY BEFORE_COMMIT [AFTER_TREE]     (AFTER_TREE: this checkout)
#   bench/before_after.sh /tmp/bench-reg 7400c93
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
REGISTRY=${1:?registry folder with a promoted version}
BEFORE=${2:?the commit to compare with}
AFTER_TREE=${3:-$ROOT}
PY=${PY:-$ROOT/.venv/bin/python}
IMAGES=${IMAGES:-5}
DATA=${DATA:-$ROOT/../shared/data/cifar10/train.tar.gz}
OUT=${OUT:-/tmp/shapserve-before-after}
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
mkdir -p "$OUT"
BEFORE_TREE="$OUT/tree-$BEFORE"
[ -d "$BEFORE_TREE" ] || git -C "$ROOT" worktree add --detach "$BEFORE_TREE" "$BEFORE" >/dev/null
# one CIFAR JPEG as the /predict body, and wrk's script that posts it
"$PY" - "$DATA" "$OUT/cat.jpg" <<'PYEOF'
import sys, tarfile
with tarfile.open(sys.argv[1], "r|*") as tar:
    for m in tar:
        if m.isfile() and "/cat/" in m.name:
            open(sys.argv[2], "wb").write(tar.extractfile(m).read())
            break
PYEOF
cat > "$OUT/predict.lua" <<LUA
local f = io.open("$OUT/cat.jpg", "rb"); local jpeg = f:read("*all"); f:close()
local b = "shapservebenchboundary"
wrk.method = "POST"
wrk.headers["Content-Type"] = "multipart/form-data; boundary=" .. b
wrk.body = "--" .. b .. "\r\nContent-Disposition: form-data; name=\"file\"; filename=\"cat.jpg\"\r\n" ..
  "Content-Type: image/jpeg\r\n\r\n" .. jpeg .. "\r\n--" .. b .. "--\r\n"
LUA

predict() {  # tree label
  local tree=$1 label=$2 port
  port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  (cd "$tree" && PYTHONPATH="$tree" MODEL_REGISTRY="$REGISTRY" PORT=$port HOST=127.0.0.1 LOG_LEVEL=warning \
     REDIS_URL=redis://127.0.0.1:6379/15 PRECISION=fp32 exec "$PY" -m service >"$OUT/api-$label.log" 2>&1) &
  local pid=$!
  for _ in $(seq 600); do curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break; sleep 0.5; done
  wrk -t1 -c16 -d3s -s "$OUT/predict.lua" "http://127.0.0.1:$port/predict" >/dev/null
  wrk -t1 -c16 -d20s --latency -s "$OUT/predict.lua" "http://127.0.0.1:$port/predict" >"$OUT/wrk-$label.txt"
  kill "$pid"; wait "$pid" 2>/dev/null || true
  local rps p99
  rps=$(awk '/Requests\/sec/ {print $2}' "$OUT/wrk-$label.txt")
  p99=$(awk '$1 == "99%" {print $2}' "$OUT/wrk-$label.txt")
  echo "$label predict_c16_rps=$rps p99=$p99" >>"$OUT/summary.txt"
}

explain() {  # tree label
  EXPLAIN_PRECISION=fp32 "$PY" "$ROOT/bench/explain_http.py" --registry "$REGISTRY" --tree "$1" --label "$2" \
    --images "$IMAGES" --samples 5000 --segments 50 --data "$DATA" --out "$OUT" --logs "$OUT" >"$OUT/explain-$2.txt"
  echo "$2 explain $(tail -n 3 "$OUT/explain-$2.txt" | tr '\n' ' ')" >>"$OUT/summary.txt"
}

: >"$OUT/summary.txt"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); load before: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/summary.txt"
for round in 1 2; do  # interleaved, so that a drift of the machine hits both
  predict "$BEFORE_TREE" "before-$round"; predict "$AFTER_TREE" "after-$round"
done
explain "$BEFORE_TREE" before; explain "$AFTER_TREE" after
cat "$OUT/summary.txt"
