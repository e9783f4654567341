#!/usr/bin/env bash
# Proving-ground val mIoU of the segmenter heads (issue 13 item 5): each head is trained on the
# ground-truth masks of a synthetic world with its reference recipe, then predicted and scored.
#
#   bash benchmarks/bench_seg_heads.sh [WORK_DIR] [HEAD ...]      (default heads: deeplabv2 deeplabv3plus)
#
# resnet18 with random weights (no pretrained weights here), 300 iterations, batch 8, crop 192:
# a floor for comparing heads on this CPU, not the recipes' published figures.
set -euo pipefail
work=${1:-/tmp/ssr-bench-seg-heads}
shift || true
heads=("$@")
[ ${#heads[@]} -eq 0 ] && heads=(deeplabv2 deeplabv3plus)
export HF_HUB_OFFLINE=1
ssr=${SSR:-ssr}
$ssr data synth --out "$work/world" --images 200 --seed 0 --val-fraction 0.25 --overwrite
for head in "${heads[@]}"; do
  start=$(date +%s)
  $ssr fit-seg --data "$work/world" --split train --pseudo "$work/world/masks" --out "$work/seg-$head" \
    --head "$head" --backbone resnet18 --no-pretrained --iters 300 --batch-size 8 --crop-size 192 --overwrite
  fit=$(( $(date +%s) - start ))
  $ssr predict --model "$work/seg-$head" --data "$work/world" --split val --out "$work/pred-$head" --overwrite
  miou=$($ssr eval "$work/pred-$head" --data "$work/world" --split val --json \
    | python -c "import json, sys; print(f\"{100 * json.load(sys.stdin)['summary']['miou']:.2f}\")")
  echo "head $head: val mIoU $miou %, fit-seg $fit s"
done
