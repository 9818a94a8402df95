#!/usr/bin/env bash
# Side by side on one machine, one after the other: shapserve and BentoML (bench/bentoml_peer)
# serving the same model version to the same closed-loop load, the same 32-px CIFAR JPEG,
# SECONDS_PER_LEVEL per level. Not in CI.
#
#   bench/compare_bentoml.sh [REGISTRY] [LEVELS...]     e.g. bench/compare_bentoml.sh models 1 4 16 64 256 1024
#
# The load is wrk (Debian's, installed here with apt-get when missing) through bench/wrk_predict.py:
# no back-off, each connection sends again as soon as it is answered (issue 27). CLIENT=aiohttp runs
# the previous client instead (bench/load_predict.py: aiohttp, honours Retry-After up to 1 s).
#
# BentoML goes into a venv of its own (BENTO_VENV, default /work/bento-venv, made on first use;
# it reads torch and shapcore from this checkout's .venv through a .pth file, so that both servers
# run the very same torch build). Results: bench/results/predict-<label>-*.json and the tables.
set -euo pipefail
cd "$(dirname "$0")/.."
REGISTRY=${1:-models}
shift || true
LEVELS=("${@:-1 4 16 64 256 1024}")
# shellcheck disable=SC2206
LEVELS=(${LEVELS[*]})
SECONDS_PER_LEVEL=${SECONDS_PER_LEVEL:-20}
BENTO_VENV=${BENTO_VENV:-/work/bento-venv}
BENTOML_VERSION=${BENTOML_VERSION:-1.4.*}
PY=${PY:-.venv/bin/python}
CLIENT=${CLIENT:-wrk}

if [ "$CLIENT" = wrk ] && ! command -v wrk >/dev/null; then
    if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq wrk; else sudo apt-get install -y wrk; fi
fi

if [ ! -x "$BENTO_VENV/bin/python" ] || ! "$BENTO_VENV/bin/python" -c "import bentoml" 2>/dev/null; then
    python3 -m venv "$BENTO_VENV"
    "$BENTO_VENV/bin/pip" install -q "bentoml==$BENTOML_VERSION"
fi
site=$("$BENTO_VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
ours=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$ours" > "$site/zz-shapserve-venv.pth"  # after BentoML's own packages on sys.path
"$BENTO_VENV/bin/python" -c "import bentoml, torch; print('bentoml', bentoml.__version__, 'torch', torch.__version__)"

stamp=$(date -u +%Y%m%dT%H%M%SZ)
if [ "$CLIENT" = wrk ]; then
    common=(--registry "$REGISTRY" --levels "${LEVELS[@]}" --seconds "$SECONDS_PER_LEVEL" --warmup 3)
    $PY bench/wrk_predict.py "${common[@]}" --label "side-shapserve-$stamp" --server shapserve
    $PY bench/wrk_predict.py "${common[@]}" --label "side-bentoml-$stamp" --server bentoml \
        --bento-python "$BENTO_VENV/bin/python"
else
    common=(--registry "$REGISTRY" --configs batch --concurrency "${LEVELS[@]}" --seconds "$SECONDS_PER_LEVEL"
            --warmup 3)
    $PY bench/load_predict.py "${common[@]}" --label "side-shapserve-$stamp" --server shapserve
    $PY bench/load_predict.py "${common[@]}" --label "side-bentoml-$stamp" --server bentoml \
        --bento-python "$BENTO_VENV/bin/python"
fi
