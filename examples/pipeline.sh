#!/usr/bin/env bash
# The SSR pipeline on the bundled example photos (examples/voc, VOC layout), stage by stage.
# Copy it and change DATA/SPLIT/RUNS for your own data. Every stage resumes if rerun.
#
#   bash examples/pipeline.sh            # after `make install` (or `make demo`, which does both)
#
# Weights: pretrained CLIP is used when it is found (SSR_CLIP_WEIGHTS, or the local caches that
# `ssr make-seeds --help` lists). Offline without weights, the demo runs with UNTRAINED models:
# the commands, files and formats are real, the masks are meaningless, and it says so.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DATA="${DATA:-$HERE/voc}"
SPLIT="${SPLIT:-train}"
EVAL_SPLIT="${EVAL_SPLIT:-val}"
RUNS="${RUNS:-$HERE/../runs/demo}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
SSR="${SSR:-ssr}"

# Where would CLIP's weights come from? (the same resolution make-seeds uses; no download here)
CLIP_WEIGHTS="$(python - <<'PY' 2>/dev/null || true
from ssr_cli.models.clip import clip_weights_source
try:
    print(clip_weights_source("ViT-B-16", None).path)
except Exception:
    print("random")
PY
)"
CLIP_WEIGHTS="${CLIP_WEIGHTS:-random}"
banner() {
  if [ "$CLIP_WEIGHTS" = "random" ]; then
    echo "================================================================================"
    echo " DEMO WITH UNTRAINED MODELS: no CLIP weights were found and nothing is downloaded."
    echo " Every stage below really runs, but the CAMs and labels are meaningless."
    echo " For real results put OpenAI's ViT-B-16.pt where 'ssr make-seeds --help' says,"
    echo " or set SSR_CLIP_WEIGHTS=/path/to/ViT-B-16.pt, and rerun."
    echo "================================================================================"
  else
    echo "Using CLIP weights: $CLIP_WEIGHTS"
  fi
}
banner

echo "== 1. check the dataset"
$SSR data check --data "$DATA" --split "$SPLIT"

echo "== 2. CLIP GradCAM seeds"
$SSR make-seeds --data "$DATA" --split "$SPLIT" --out "$RUNS/seeds" --clip-weights "$CLIP_WEIGHTS"

echo "== 3. score the seeds against the ground truth of '$EVAL_SPLIT' (background rule searched)"
$SSR make-seeds --data "$DATA" --split "$EVAL_SPLIT" --out "$RUNS/seeds-$EVAL_SPLIT" \
  --clip-weights "$CLIP_WEIGHTS"
$SSR eval "$RUNS/seeds-$EVAL_SPLIT" --data "$DATA" --split "$EVAL_SPLIT" --search-bg

echo "== done: run folders under $RUNS"
banner
