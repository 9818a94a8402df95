#!/usr/bin/env bash
# Reassemble the `cpu32` version that bench/gpu_session.sh shipped back in chunks (weights as
# fp16, the cap on files coming back from the device) into a registry here, weights as fp32 again.
# Usage: bench/gpu_import.sh FILES_DIR [REGISTRY]   (then: evaluate --holdout on the CPU to compare)
set -euo pipefail
SRC=$1
REG=${2:-models}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$REG"
cat "$SRC"/cpu32.tar.part-* | tar -C "$REG" -xf -
V=$(cat "$SRC"/cpu32.tar.part-* | tar -tf - | awk -F/ 'NR == 1 {print $1}')
$PY - "$REG/$V" <<'PY'
import sys
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import load_file, save_file
folder = Path(sys.argv[1])
state = load_file(folder / "model.fp16.safetensors")
with safe_open(folder / "model.fp16.safetensors", "pt") as fh:
    meta = fh.metadata()
save_file({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, folder / "model.safetensors", metadata=meta)
(folder / "model.fp16.safetensors").unlink()
print(folder.name)
PY
