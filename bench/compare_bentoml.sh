#!/usr/bin/env bash
# Side by side on one machine, one after the other: shapserve and BentoML (bench/bentoml_peer)
# serving the same model version to the same closed-loop client (bench/load_predict.py), the
# same 32-px CIFAR JPEG, --seconds per concurrency level. Not in CI.
#
#   bench/compare_bentoml.sh [REGISTRY] [LEVELS...]     e.g. bench/compare_bentoml.sh models 1 4 16 64
#
# BentoML goes into a venv of its own (BENTO_VENV, default /work/bento-venv, made on first use;
# it reads torch and shapcore from this checkout's .venv through a .pth file, so that both servers
# run the very same torch build). Results: bench/results/predict-<label>-*.json and the tables.
set -euo pipefail
cd "$(dirname "$0")/.."
REGISTRY=${1:-models}
shift || true
LEVELS=("${@:-1 4 16 64}")
# shellcheck disable=SC2206
LEVELS=(${LEVELS[*]})
SECONDS_PER_LEVEL=${SECONDS_PER_LEVEL:-20}
BENTO_VENV=${BENTO_VENV:-/work/bento-venv}
BENTOML_VERSION=${BENTOML_VERSION:-1.4.*}
PY=.venv/bin/python

if [ ! -x "$BENTO_VENV/bin/python" ] || ! "$BENTO_VENV/bin/python" -c "import bentoml" 2>/dev/null; then
    python3 -m venv "$BENTO_VENV"
    "$BENTO_VENV/bin/pip" install -q "bentoml==$BENTOML_VERSION"
fi
site=$("$BENTO_VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
ours=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$ours" > "$site/zz-shapserve-venv.pth"  # after BentoML's own packages on sys.path
"$BENTO_VENV/bin/python" -c "import bentoml, torch; print('bentoml', bentoml.__version__, 'torch', torch.__version__)"

stamp=$(date -u +%Y%m%dT%H%M%SZ)
common=(--registry "$REGISTRY" --configs batch --concurrency "${LEVELS[@]}" --seconds "$SECONDS_PER_LEVEL"
        --warmup 3)
$PY bench/load_predict.py "${common[@]}" --label "side-shapserve-$stamp" --server shapserve
$PY bench/load_predict.py "${common[@]}" --label "side-bentoml-$stamp" --server bentoml \
    --bento-python "$BENTO_VENV/bin/python"
