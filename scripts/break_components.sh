#!/usr/bin/env bash
# Break each SSR component on purpose, one at a time, and run tests/test_quality.py: every
# breakage must make tests fail. Prints one line per breakage (pytest's summary line).
#
#   bash scripts/break_components.sh            # about 2 minutes on 2 CPU cores
#
# Each file is patched in place and restored byte for byte from a copy afterwards (also on
# Ctrl-C); the last line runs the suite unbroken.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1
backup=""
restore() { if [[ -n "$backup" ]]; then cp "$backup" "$target"; rm -f "$backup"; backup=""; fi; }
trap restore EXIT INT TERM

breakage() {  # NAME FILE OLD NEW: replace the one occurrence of OLD in FILE by NEW, test, restore
  local name="$1"; target="$2"
  backup=$(mktemp)
  cp "$target" "$backup"
  "$PY" - "$target" "$3" "$4" <<'PY'
import sys
path, old, new = sys.argv[1:4]
text = open(path).read()
if text.count(old) != 1:
    sys.exit(f"break_components: {path}: the code to break was not found once; update this script")
open(path, "w").write(text.replace(old, new))
PY
  local summary
  summary=$("$PY" -m pytest -q -p no:cacheprovider tests/test_quality.py 2>&1 | tail -n 1 || true)
  restore
  echo "$name: $summary"
}

breakage "negated GradCAM weight" ssr_cli/cam/gradcam.py \
  "weights = g.mean(dim=1, keepdim=True)" "weights = -g.mean(dim=1, keepdim=True)"
breakage "identity affinity" ssr_cli/refine/affinity.py \
  "    return torch.linalg.matrix_power(fused, power)" \
  "    return torch.eye(fused.shape[-1], dtype=fused.dtype).expand_as(fused).clone()"
breakage "all-ones SGC mask" ssr_cli/refine/sgc.py \
  "    return sgc_regions(image, cams, grid_hw, params, **overrides).masks" \
  "    return np.ones_like(sgc_regions(image, cams, grid_hw, params, **overrides).masks)"
breakage "CRF returns its input" ssr_cli/refine/crf.py \
  "    import pydensecrf.densecrf as dcrf
" "    return np.asarray(probs, np.float32)
    import pydensecrf.densecrf as dcrf
"
breakage "CMPA heads output noise" ssr_cli/models/cmpa.py \
  "        return z + self.fc2(self.act(self.fc1(z)))" "        return torch.randn_like(z)"
echo "unbroken: $("$PY" -m pytest -q -p no:cacheprovider tests/test_quality.py 2>&1 | tail -n 1 || true)"
