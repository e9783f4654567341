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
#
#   scripts/gpu_check.sh --fetch-wheels
#
# prepares .whl/ on a machine with the package index, for a GPU machine whose python3 is 3.12
# with torch, timm, typer, rich, scikit-learn, safetensors and OpenCV but without the rest:
# open_clip_torch, ftfy, wcwidth (downloaded for CPython 3.12 / manylinux x86-64) and
# pydensecrf2 (sdist only: built with a local Python 3.12, $PYTHON312 or python3.12 or
# pyenv's). OpenCV's contrib wheel (cv2.ximgproc, SLIC) is too large to travel (56-70 MB); without
# it the check runs refine with --mask box, whose GPU part is the same, and says so.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
export HF_HUB_OFFLINE=1

if [ "${1:-}" = "--fetch-wheels" ]; then
  WHL="$REPO/.whl"
  mkdir -p "$WHL"
  if [ -d "$REPO/.git/info" ] && ! grep -qx '/.whl/' "$REPO/.git/info/exclude" 2>/dev/null; then
    echo '/.whl/' >>"$REPO/.git/info/exclude"
  fi
  PIP_PY="$(command -v python3)"
  "$PIP_PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHL" open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
  PY312="${PYTHON312:-}"
  if [ -z "$PY312" ]; then
    for cand in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
      if "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
        PY312="$cand"
        break
      fi
    done
  fi
  if [ -z "$PY312" ]; then
    echo "gpu_check: error: no Python 3.12 to build pydensecrf2 (set PYTHON312=/path/to/python3.12)" >&2
    exit 1
  fi
  "$PY312" -m pip wheel -q --no-deps -w "$WHL" pydensecrf2==1.1
  ls -l "$WHL"
  echo "gpu_check: wheels ready in $WHL ($(du -sh "$WHL" | cut -f1)); carry .whl with the GPU run" >&2
  exit 0
fi

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
have_deps='import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ("open_clip", "ftfy", "pydensecrf")))'
if [ ${#wheels[@]} -gt 0 ] && ! "$PY" -c "$have_deps" 2>/dev/null; then
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
