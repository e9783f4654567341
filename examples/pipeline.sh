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
RUNS="${RUNS:-$(cd "$HERE/.." && pwd)/runs/demo}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
SSR="${SSR:-ssr}"

# Where would the weights come from? (the same resolution the stages use; nothing is downloaded)
resolve() {  # $1 = clip|dino|backbone
  python - "$1" <<'PY' 2>/dev/null || echo random
import sys
kind = sys.argv[1]
try:
    if kind == "clip":
        from ssr_cli.models.clip import clip_weights_source as f; print(f("ViT-B-16", None).path)
    elif kind == "dino":
        from ssr_cli.models.dino import dino_weights_source as f; print(f("dino_vitb16", None).path)
    else:
        from ssr_cli.models.backbone_weights import resolve_backbone_state as f
        print("pretrained" if f("resnet101", None) is not None else "random")
except Exception:
    print("random")
PY
}
CLIP_WEIGHTS="${SSR_CLIP_WEIGHTS:-$(resolve clip)}"
DINO_WEIGHTS="${SSR_DINO_WEIGHTS:-$(resolve dino)}"
BACKBONE="$(resolve backbone)"
UNTRAINED=""
[ "$CLIP_WEIGHTS" = "random" ] && UNTRAINED="$UNTRAINED CLIP"
[ "$DINO_WEIGHTS" = "random" ] && UNTRAINED="$UNTRAINED DINO"
[ "$BACKBONE" = "random" ] && UNTRAINED="$UNTRAINED segmenter-backbone"
BACKBONE_FLAG=""
[ "$BACKBONE" = "random" ] && BACKBONE_FLAG="--no-pretrained"
SEG_ITERS="${SEG_ITERS:-12}"

banner() {
  if [ -n "$UNTRAINED" ]; then
    echo "================================================================================"
    echo " DEMO WITH UNTRAINED MODELS:$UNTRAINED (no weights found; nothing is downloaded)."
    echo " Every stage below really runs, but the CAMs, pseudo-labels and scores are"
    echo " meaningless. For real results supply the weights (see README, 'Weights'):"
    echo " SSR_CLIP_WEIGHTS=ViT-B-16.pt SSR_DINO_WEIGHTS=dino_vitbase16_pretrain.pth"
    echo "================================================================================"
  else
    echo "Using pretrained weights: CLIP $CLIP_WEIGHTS, DINO $DINO_WEIGHTS"
  fi
}
banner

echo "== 1. check the dataset"
$SSR data check --data "$DATA" --split "$SPLIT"

echo "== 2. CLIP GradCAM seeds (and the CLIP attention refine needs)"
$SSR make-seeds --data "$DATA" --split "$SPLIT" --out "$RUNS/seeds" --clip-weights "$CLIP_WEIGHTS"
$SSR eval "$RUNS/seeds" --data "$DATA" --split "$EVAL_SPLIT" --search-bg --allow-missing

echo "== 3. SSR refinement: CLIP+DINO affinity, superpixel mask, CRF -> pseudo-labels"
$SSR refine --seeds "$RUNS/seeds" --out "$RUNS/refine" --dino-weights "$DINO_WEIGHTS"
$SSR eval "$RUNS/refine" --data "$DATA" --split "$EVAL_SPLIT" --allow-missing

echo "== 4. train the segmenter on the pseudo-labels ($SEG_ITERS steps: a smoke run)"
$SSR fit-seg --data "$DATA" --split "$SPLIT" --pseudo "$RUNS/refine" --out "$RUNS/seg" \
  --backbone resnet101 $BACKBONE_FLAG --iters "$SEG_ITERS" --batch-size 2 --crop-size 321 \
  --save-every 6 --val-split "$EVAL_SPLIT"

echo "== 5. predict (multi-scale + flip) and score on '$EVAL_SPLIT'"
$SSR predict --model "$RUNS/seg" --data "$DATA" --split "$EVAL_SPLIT" --out "$RUNS/pred" \
  --scales 0.75,1.0,1.25 --flip
$SSR eval "$RUNS/pred" --data "$DATA" --split "$EVAL_SPLIT"

echo "== done: run folders under $RUNS"
banner
