#!/usr/bin/env bash
# `make demo`: the whole SSR pipeline on the synthetic proving-ground world, with the tiny CLIP
# and DINO in examples/models that were trained on that world (scripts/train_tiny_*.py), so
# the numbers it prints are real measurements of a working pipeline (about 1-2 minutes on 2
# CPU cores). Then, when real CLIP/DINO weights are found, the real-photo pipeline
# (examples/pipeline.sh) runs too.
#
#   bash examples/demo.sh            # after `make install`, or `make demo`, which does both
#
# The tiny models are a test world for the pipeline, not a substitute for the real weights:
# they know 8 synthetic shape classes and nothing else.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RUNS="${RUNS:-$(cd "$HERE/.." && pwd)/runs/demo-synth}"
MODELS="$HERE/models"
IMAGES="${IMAGES:-80}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
SSR="${SSR:-ssr}"
DATA="$RUNS/data"
SEG_ITERS="${SEG_ITERS:-40}"
CLIP=(--clip-arch "$MODELS/ssr-tiny-clip.json" --clip-weights "$MODELS/tiny_clip.pt")
DINO=(--dino-model "$MODELS/ssr-tiny-dino.json" --dino-weights "$MODELS/tiny_dino.pth")
START=$SECONDS

# The runs below resume when interrupted. When the tiny models or the world's generator have
# changed since the last demo in $RUNS (an update of this repository), its runs are stale:
# the demo's own folders are removed and it starts over (nothing else in $RUNS is touched).
STAMP=$(cat "$MODELS"/ssr-tiny-clip.json "$MODELS"/tiny_clip.pt "$MODELS"/ssr-tiny-dino.json \
  "$MODELS"/tiny_dino.pth "$HERE"/../ssr_cli/data/synth.py "$HERE"/../ssr_cli/data/synth_art.py | sha256sum | cut -c1-16)
if [ -d "$RUNS" ] && [ "$(cat "$RUNS/.demo-inputs" 2>/dev/null || true)" != "$STAMP" ] \
  && [ -e "$RUNS/data" -o -e "$RUNS/cmpa" ]; then
  echo "(the tiny models or the synthetic world changed since the last demo in $RUNS: starting over)"
  rm -rf "$RUNS"/{data,cmpa,seeds,refine,seg,pred,report}
fi
mkdir -p "$RUNS"
echo "$STAMP" > "$RUNS/.demo-inputs"

echo "== 1. a synthetic world with known answers: $IMAGES images, 8 classes (ssr data synth)"
[ -f "$DATA/labels.txt" ] || $SSR data synth --out "$DATA" --images "$IMAGES" --seed 0 --val-fraction 0.25 --overwrite
$SSR --quiet data check --data "$DATA" --split train >/dev/null

echo "== 2. CMPA heads on frozen tiny CLIP (ssr train-cmpa)"
$SSR train-cmpa --data "$DATA" --split train --out "$RUNS/cmpa" "${CLIP[@]}" --iters 20 --batch-size 16 \
  --size 160 --proto-every 10 --dim 64 --save-every 10 --init-images 60 --resume

echo "== 3. CAM seeds in the CMPA space (ssr make-seeds)"
$SSR make-seeds --data "$DATA" --split train --out "$RUNS/seeds" "${CLIP[@]}" --cmpa "$RUNS/cmpa"

echo "== 4. SGC affinity correction + CRF -> pseudo-labels (ssr refine)"
$SSR refine --seeds "$RUNS/seeds" --out "$RUNS/refine" "${DINO[@]}"

echo "== 5. a segmenter on the pseudo-labels (ssr fit-seg; ResNet-18 from scratch, $SEG_ITERS steps)"
$SSR fit-seg --data "$DATA" --split train --pseudo "$RUNS/refine" --out "$RUNS/seg" --backbone resnet18 \
  --no-pretrained --iters "$SEG_ITERS" --batch-size 8 --crop-size 128 --aspp-channels 64 --optimizer adamw \
  --lr 1e-3 --head-lr-mult 1 --val-split val --val-every 0 --save-every "$SEG_ITERS" --resume

echo "== 6. predict on the val split (ssr predict)"
$SSR predict --model "$RUNS/seg" --data "$DATA" --split val --out "$RUNS/pred"

echo "== 7. score every stage (ssr eval) and draw the report (ssr report)"
miou() {  # $1 = run, $2 = split, rest = eval flags -> "mIoU %"
  local run=$1 split=$2
  shift 2
  $SSR --quiet eval "$run" --data "$DATA" --split "$split" --json "$@" |
    python -c 'import json,sys; s=json.load(sys.stdin)["summary"]; print("%5.1f" % (100 * s["miou"]))'
}
SEEDS_MIOU=$(miou "$RUNS/seeds" train --search-bg)
REFINE_MIOU=$(miou "$RUNS/refine" train)
PRED_MIOU=$(miou "$RUNS/pred" val)
$SSR --quiet report "$RUNS/seeds" "$RUNS/refine" --data "$DATA" --split train --out "$RUNS/report" --limit 40
cat <<EOF

================================================================================
 Synthetic world, tiny trained models ($((SECONDS - START)) s). mIoU in % (higher is better):
   CAM seeds + CMPA (train, best background rule)   $SEEDS_MIOU
   + SGC + CRF pseudo-labels (train)                $REFINE_MIOU
   segmenter (val; $SEG_ITERS steps from scratch)           $PRED_MIOU
 Report: $RUNS/report/index.html
 What the numbers mean: README.md, "Start here". Full ablation table:
   python benchmarks/bench_quality.py --quick
================================================================================
EOF

resolve() {  # $1 = clip|dino: where real weights would come from, or "random"
  python - "$1" <<'PY' 2>/dev/null || echo random
import sys
try:
    if sys.argv[1] == "clip":
        from ssr_cli.models.clip import clip_weights_source as f; print(f("ViT-B-16", None).path)
    else:
        from ssr_cli.models.dino import dino_weights_source as f; print(f("dino_vitb16", None).path)
except Exception:
    print("random")
PY
}
if [ "$(resolve clip)" != random ] && [ "$(resolve dino)" != random ]; then
  echo "== real CLIP and DINO weights found: the real-photo pipeline (examples/pipeline.sh)"
  bash "$HERE/pipeline.sh"
else
  echo "(no real CLIP/DINO weights found, so the real-photo pipeline examples/pipeline.sh is skipped;"
  echo " see README 'Weights' to add them)"
fi
