#!/usr/bin/env bash
# Everything that needs a GPU, in one run on a lent device machine (see BENCHMARKS.md):
# the `paper` profile on the shared training images, the training throughput per profile,
# and the tests marked `cuda`. Outputs go to $OUT (the device tool brings them back).
#
# On the device the image's python3 has torch/torchvision but not kornia: carry wheels in
# .whl/ (kornia, kornia_rs) and the data archive in data/ (both git-ignored):
#   run(command="bash bench/gpu_session.sh", carry=[".whl", "data"], timeout_s=560)
set -uo pipefail
OUT=${OUT:-var/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD SHAPSERVE_CACHE=/tmp/shapserve-cache
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
DATA=${DATA:-data/train.tar.gz}
REG=/tmp/gpu-models
nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt"
python3 bench/train_throughput.py --device cuda --data "$DATA" --steps 20 2>&1 | tee "$OUT/throughput.txt"
/usr/bin/time -v python3 -m training --quiet --registry "$REG" train --data "$DATA" --profile paper \
  ${WEIGHTS:+--weights "$WEIGHTS"} --promote 2>&1 | tee "$OUT/train_paper.txt"
python3 -m training --quiet --registry "$REG" evaluate --data "$DATA" --holdout 2>&1 | tee "$OUT/eval_paper.txt"
cp -r "$REG"/2*/metadata.json "$REG"/2*/metrics.json "$REG"/2*/history.json "$OUT"/ 2>/dev/null
python3 -m pytest -q -m cuda tests 2>&1 | tail -5 | tee "$OUT/pytest_cuda.txt"
