#!/usr/bin/env bash
# One command that checks every GPU path of ssr-cli and writes the GPU figures (issue 16).
#
#   scripts/gpu_check.sh --out DIR [--device cuda|cuda:N|cpu] [--time-limit 480] [options]
#
# Writes DIR/gpu_check.json, DIR/gpu_check.md (also printed) and DIR/gpu_check.log; exits 0
# when every step succeeded, 1 otherwise. `scripts/gpu_check.sh --help` lists the options;
# README.md, "GPU check", says what it measures. The Python part is scripts/gpu_check.py.
#
# Python: $PYTHON if set, else the repository's .venv, else python3 (a GPU machine's own
# torch). When .whl/ at the repository root holds wheels (packages that machine lacks, such
# as open_clip_torch or pydensecrf2), they are installed into a temporary folder first,
# without network, and put on PYTHONPATH.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
export HF_HUB_OFFLINE=1

if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
elif [ -x "$REPO/.venv/bin/python" ]; then
  PY="$REPO/.venv/bin/python"
else
  PY="$(command -v python3 || true)"
fi
if [ -z "$PY" ] || ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "gpu_check: error: no Python 3.10+ found (set PYTHON=/path/to/python)" >&2
  exit 1
fi

shopt -s nullglob
wheels=("$REPO"/.whl/*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
  SITE="${TMPDIR:-/tmp}/ssr-gpu-check-site"
  if [ ! -f "$SITE/.installed" ]; then
    echo "gpu_check: installing ${#wheels[@]} wheel(s) from .whl/ into $SITE" >&2
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "${wheels[@]}" >&2
    touch "$SITE/.installed"
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" "$HERE/gpu_check.py" "$@"
