#!/usr/bin/env bash
# bench/explain_compare.py on a lent GPU: the KernelSHAP references (samples 20000) and every
# method's quality figures over 100 held-out images, in a few minutes instead of hours on the
# 2-core CPU. Seconds per explanation on the CPU come from a CPU run here (BENCHMARKS.md).
#
# Carry .gpu/ (git-ignored), prepared here:
#   .gpu/reg/<version>/   the version with its weights as fp16 (bench/gpu_session.sh's cpu32 export)
#   .gpu/holdout100.npz   explain_compare.py --export-images (the 100 held-out images)
#   .gpu/whl/             cp312 wheels the device image lacks: shap, slicer, captum, pydantic(-core,
#                         -settings), python-dotenv, annotated-types, typing-inspection, typing_extensions
#   run(command="bash bench/gpu_explain_compare.sh", carry=[".gpu"], timeout_s=...)
set -uo pipefail
START=$(date +%s)
BUDGET_S=${BUDGET_S:-280}
OUT=${OUT:-var/gpu}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
left() { echo $((BUDGET_S - ($(date +%s) - START))); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 SHAPSERVE_CACHE=/tmp/shapserve-cache
mkdir -p /tmp/reg && cp -r .gpu/reg/* /tmp/reg/
python3 - <<'PY'
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import load_file, save_file
for path in Path("/tmp/reg").glob("*/model.fp16.safetensors"):
    with safe_open(path, "pt") as fh:
        meta = fh.metadata()
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(path).items()}
    save_file(state, path.with_name("model.safetensors"), metadata=meta)
    path.unlink()
    print("restored", path.parent.name)
PY
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
V=$(ls /tmp/reg | head -1)
COMMON=(--registry /tmp/reg --version "$V" --data .gpu/holdout100.npz --images "${IMAGES:-100}" --device cuda
        --cache /tmp/refcache --threads "${THREADS:-8}")
echo "=== references, samples 20000 ($(left) s left)"
REF_SHARE=${REF_SHARE:-40}   # percent of what is left for the references (100: references only)
timeout $(( $(left) * REF_SHARE / 100 - 5 )) python3 bench/explain_compare.py "${COMMON[@]}" --references-only
tar -C /tmp -czf "$OUT/refcache.tar.gz" refcache   # the cache back here: explain_compare.py --cache
if [ "$REF_SHARE" -lt 100 ]; then
  echo "=== every method, against the references ($(left) s left)"
  timeout $(( $(left) - 10 )) python3 bench/explain_compare.py "${COMMON[@]}" --label gpu-s7 --out "$OUT"
fi
echo "=== done in $(( $(date +%s) - START )) s"
