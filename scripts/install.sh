#!/usr/bin/env bash
# Create the virtual environment ($VENV, default .venv) and install shapserve into it with
# its dev tools. Needs only Python 3.11+ and access to PyPI. Does nothing when the venv is
# newer than pyproject.toml (FORCE=1: install anyway).
#
#   PYTHON=python3.12 scripts/install.sh        pick the interpreter (default: the newest
#                                               python3.x >= 3.11 on PATH)
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu scripts/install.sh
#                                               take torch from another index (CPU-only
#                                               wheels are ~10x smaller than PyPI's CUDA ones)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
STAMP="$VENV/.installed"

if [ "${FORCE:-0}" != 1 ] && [ -x "$VENV/bin/python" ] && [ "$STAMP" -nt pyproject.toml ]; then
  exit 0
fi

version_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; }

if [ ! -x "$VENV/bin/python" ]; then
  PY=${PYTHON:-}
  if [ -z "$PY" ]; then
    for candidate in python3.14 python3.13 python3.12 python3.11 python3 python; do
      if command -v "$candidate" >/dev/null 2>&1 && version_ok "$candidate"; then PY=$candidate; break; fi
    done
  fi
  if [ -z "$PY" ] || ! version_ok "$PY"; then
    echo "error: shapserve needs Python 3.11 or newer (found: ${PY:-none}; set PYTHON=/path/to/python3.11)" >&2
    exit 1
  fi
  echo "creating $VENV with $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
  if ! "$PY" -m venv "$VENV" 2>/tmp/shapserve-venv.$$.err; then
    # Debian/Ubuntu ship venv without ensurepip (package python3-venv): bootstrap pip from PyPI.
    echo "python -m venv failed ($(tail -n1 /tmp/shapserve-venv.$$.err)); creating it without pip and" \
         "bootstrapping pip from PyPI"
    rm -rf "$VENV"
    "$PY" -m venv --without-pip "$VENV"
    "$VENV/bin/python" - <<'EOF'
import json, os, subprocess, sys, tempfile, urllib.request
index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
base = index[: -len("/simple")] if index.endswith("/simple") else "https://pypi.org"
with urllib.request.urlopen(f"{base}/pypi/pip/json", timeout=60) as r:
    meta = json.load(r)
url = next(f["url"] for f in meta["urls"] if f["packagetype"] == "bdist_wheel")
wheel = os.path.join(tempfile.mkdtemp(), url.rsplit("/", 1)[1])
urllib.request.urlretrieve(url, wheel)
subprocess.check_call([sys.executable, os.path.join(wheel, "pip"), "install", "-q", wheel])
EOF
  fi
  rm -f /tmp/shapserve-venv.$$.err
fi

PIP=("$VENV/bin/python" -m pip)
echo "installing into $VENV: pip, torch + torchvision (large: a few minutes on a fresh machine), shapserve[dev,runtimes]"
"${PIP[@]}" install -q --upgrade pip
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  "${PIP[@]}" install -q --index-url "$TORCH_INDEX_URL" 'torch>=2.11' 'torchvision>=0.26'
else
  "${PIP[@]}" install -q 'torch>=2.11' 'torchvision>=0.26'
fi
"${PIP[@]}" install -q -e '.[dev,runtimes]'
touch "$STAMP"
echo "installed: $("$VENV/bin/python" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)')"
