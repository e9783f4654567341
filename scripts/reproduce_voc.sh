#!/usr/bin/env bash
# The SSR paper's VOC ablation in one command: every row's pseudo-labels scored on VOC train, then the
# segmenter trained on train_aug pseudo-labels and scored on val, printed beside the published figures.
#
#   scripts/reproduce_voc.sh --data VOCdevkit/VOC2012 --runs runs/voc \
#       --clip-weights ViT-B-16.pt --dino-weights dino_vitbase16_pretrain.pth
#
# Rows (METHOD.md): CLIP GradCAM seeds | + CMPA | + CLIP attention | + DINO attention | + full SGC | + CRF,
# CLIP-ES's CAA and CAA + CRF on the plain seeds, then the segmenter on val (without and with CRF).
# Every stage writes a run folder under --runs and resumes: rerun the same command after a crash and
# finished stages report "already done"; scores already computed for an unchanged run are reused.
#
# Options (flag, or the environment variable in brackets):
#   --data DIR            VOC2012 folder (SegmentationClassAug beside or inside it for train_aug) [DATA]
#   --runs DIR            where the run folders go (default runs/reproduce_voc)                   [RUNS]
#   --clip-arch NAME|JSON open_clip architecture or config JSON (default ViT-B-16)                 [CLIP_ARCH]
#   --clip-weights FILE   CLIP weights (default: the stages' own lookup)                           [CLIP_WEIGHTS]
#   --dino-model NAME|JSON  DINO model (default dino_vitb16)                                       [DINO_MODEL]
#   --dino-weights FILE   DINO weights (default: the stages' own lookup)                           [DINO_WEIGHTS]
#   --backbone NAME       segmenter backbone (default resnet101)                                   [BACKBONE]
#   --backbone-weights F  segmenter backbone weights                                               [BACKBONE_WEIGHTS]
#   --no-pretrained       random segmenter backbone                                                [NO_PRETRAINED=1]
#   --cmpa-iters N        train-cmpa steps (default 10000)                                         [CMPA_ITERS]
#   --seg-iters N         fit-seg steps (default 20000)                                            [SEG_ITERS]
#   --train-split S       split of the ablation rows (default train)                               [TRAIN]
#   --train-aug-split S   split for CMPA and the segmenter (default train_aug)                     [TRAIN_AUG]
#   --val-split S         split the segmenter is scored on (default val)                           [VAL]
#   --workers N           CPU worker processes of every stage (default 2)                          [WORKERS]
#   --device D            auto | cpu | cuda | cuda:N (default auto)                                [DEVICE]
# Extra options for single stages (split on spaces): SEEDS_ARGS, CMPA_ARGS, REFINE_ARGS, SEG_ARGS,
# PREDICT_ARGS (default "--scales 0.75,1.0,1.25 --flip"), EVAL_ARGS. SSR: the command (default `ssr`,
# else `python -m ssr_cli`). PYTHON: the interpreter for the table (default python3).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
usage() { sed -n '2,30p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "reproduce_voc: error: $*" >&2; exit 2; }

DATA="${DATA:-}"
RUNS="${RUNS:-runs/reproduce_voc}"
CLIP_ARCH="${CLIP_ARCH:-}"
CLIP_WEIGHTS="${CLIP_WEIGHTS:-${SSR_CLIP_WEIGHTS:-}}"
DINO_MODEL="${DINO_MODEL:-}"
DINO_WEIGHTS="${DINO_WEIGHTS:-${SSR_DINO_WEIGHTS:-}}"
BACKBONE="${BACKBONE:-resnet101}"
BACKBONE_WEIGHTS="${BACKBONE_WEIGHTS:-}"
NO_PRETRAINED="${NO_PRETRAINED:-}"
CMPA_ITERS="${CMPA_ITERS:-10000}"
SEG_ITERS="${SEG_ITERS:-20000}"
TRAIN="${TRAIN:-train}"
TRAIN_AUG="${TRAIN_AUG:-train_aug}"
VAL="${VAL:-val}"
WORKERS="${WORKERS:-2}"
DEVICE="${DEVICE:-auto}"
PREDICT_ARGS="${PREDICT_ARGS:---scales 0.75,1.0,1.25 --flip}"
PYTHON="${PYTHON:-python3}"

while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --no-pretrained) NO_PRETRAINED=1; shift; continue ;;
  esac
  [ $# -ge 2 ] || die "$1 needs a value (see --help)"
  case "$1" in
    --data) DATA="$2" ;;
    --runs) RUNS="$2" ;;
    --clip-arch) CLIP_ARCH="$2" ;;
    --clip-weights) CLIP_WEIGHTS="$2" ;;
    --dino-model) DINO_MODEL="$2" ;;
    --dino-weights) DINO_WEIGHTS="$2" ;;
    --backbone) BACKBONE="$2" ;;
    --backbone-weights) BACKBONE_WEIGHTS="$2" ;;
    --cmpa-iters) CMPA_ITERS="$2" ;;
    --seg-iters) SEG_ITERS="$2" ;;
    --train-split) TRAIN="$2" ;;
    --train-aug-split) TRAIN_AUG="$2" ;;
    --val-split) VAL="$2" ;;
    --workers) WORKERS="$2" ;;
    --device) DEVICE="$2" ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
  shift 2
done
[ -n "$DATA" ] || die "--data VOC2012_FOLDER is required (see --help)"
[ -d "$DATA" ] || die "--data $DATA is not a folder"

if [ -n "${SSR:-}" ]; then read -r -a SSR_CMD <<< "$SSR"
elif command -v ssr > /dev/null; then SSR_CMD=(ssr)
else SSR_CMD=(python3 -m ssr_cli); fi
read -r -a SEEDS_X <<< "${SEEDS_ARGS:-}"
read -r -a CMPA_X <<< "${CMPA_ARGS:-}"
read -r -a REFINE_X <<< "${REFINE_ARGS:-}"
read -r -a SEG_X <<< "${SEG_ARGS:-}"
read -r -a PREDICT_X <<< "$PREDICT_ARGS"
read -r -a EVAL_X <<< "${EVAL_ARGS:-}"

COMMON=(--device "$DEVICE" --workers "$WORKERS")
CLIP=()
[ -n "$CLIP_ARCH" ] && CLIP+=(--clip-arch "$CLIP_ARCH")
[ -n "$CLIP_WEIGHTS" ] && CLIP+=(--clip-weights "$CLIP_WEIGHTS")
DINO=()
[ -n "$DINO_MODEL" ] && DINO+=(--dino-model "$DINO_MODEL")
[ -n "$DINO_WEIGHTS" ] && DINO+=(--dino-weights "$DINO_WEIGHTS")
SEG_MODEL=(--backbone "$BACKBONE")
[ -n "$BACKBONE_WEIGHTS" ] && SEG_MODEL+=(--backbone-weights "$BACKBONE_WEIGHTS")
[ -n "$NO_PRETRAINED" ] && SEG_MODEL+=(--no-pretrained)
mkdir -p "$RUNS/scores"

ssr() { echo "+ ssr $*" >&2; "${SSR_CMD[@]}" "$@" >&2; }  # stdout is kept for the table

fingerprint() {  # the fingerprint of a finished run folder (empty if it has none)
  "$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("fingerprint", ""))' \
    "$1/manifest.json" 2> /dev/null || true
}

score() {  # score ROW RUN SPLIT [eval options...]: RUNS/scores/ROW.json, skipped if RUN is unchanged
  local row="$1" run="$2" split="$3"; shift 3
  local out="$RUNS/scores/$row.json" stamp="$RUNS/scores/$row.fingerprint" fp
  fp="$(fingerprint "$run")"
  if [ -n "$fp" ] && [ -f "$out" ] && [ "$(cat "$stamp" 2> /dev/null)" = "$fp" ]; then
    echo "== score $row: already done ($run unchanged)" >&2
    return
  fi
  ssr eval "$run" --data "$DATA" --split "$split" --workers "$WORKERS" --out "$out" --quiet "$@" "${EVAL_X[@]}"
  echo "$fp" > "$stamp"
  echo "== score $row: written $out" >&2
}

refine() {  # refine NAME SEEDS [refine options...]
  local name="$1" seeds="$2"; shift 2
  ssr refine --seeds "$RUNS/$seeds" --out "$RUNS/$name" "${DINO[@]}" "${COMMON[@]}" "$@" "${REFINE_X[@]}"
}

echo "== 1. CLIP GradCAM seeds on '$TRAIN'" >&2
ssr make-seeds --data "$DATA" --split "$TRAIN" --out "$RUNS/seeds" "${CLIP[@]}" "${COMMON[@]}" "${SEEDS_X[@]}"
score cam "$RUNS/seeds" "$TRAIN" --search-bg

echo "== 2. CMPA heads on '$TRAIN_AUG', then CMPA seeds on '$TRAIN'" >&2
ssr train-cmpa --data "$DATA" --split "$TRAIN_AUG" --out "$RUNS/cmpa" --iters "$CMPA_ITERS" --resume \
  "${CLIP[@]}" "${COMMON[@]}" "${CMPA_X[@]}"
ssr make-seeds --data "$DATA" --split "$TRAIN" --out "$RUNS/seeds-cmpa" --cmpa "$RUNS/cmpa" \
  "${CLIP[@]}" "${COMMON[@]}" "${SEEDS_X[@]}"
score cmpa "$RUNS/seeds-cmpa" "$TRAIN" --search-bg

echo "== 3. refinement ablation on the CMPA seeds" >&2
# Scoring protocol (CLIP-ES): refined CAMs pick their background rule against the ground truth
# (--save-cams, eval --search-bg); CRF rows are scored as the plain CRF argmax (--conf-thresh 0),
# while the pseudo-labels for training keep 255 where the CRF is unsure (refine-crf).
refine refine-clip seeds-cmpa --affinity clip --mask none --no-crf --save-cams
score clip_attn "$RUNS/refine-clip" "$TRAIN" --search-bg
refine refine-dino seeds-cmpa --affinity clip+dino --mask none --no-crf --save-cams
score dino_attn "$RUNS/refine-dino" "$TRAIN" --search-bg
refine refine-sgc seeds-cmpa --affinity clip+dino --mask sgc --no-crf --save-cams
score sgc "$RUNS/refine-sgc" "$TRAIN" --search-bg
refine refine-crf seeds-cmpa --affinity clip+dino --mask sgc --crf
refine refine-crf-argmax seeds-cmpa --affinity clip+dino --mask sgc --crf --conf-thresh 0
score crf "$RUNS/refine-crf-argmax" "$TRAIN"

echo "== 4. CLIP-ES baseline (CAA) on the plain seeds" >&2
refine clip-es-caa seeds --affinity clip --mask box --no-crf --save-cams
score clip_es_caa "$RUNS/clip-es-caa" "$TRAIN" --search-bg
refine clip-es-crf seeds --affinity clip --mask box --crf --conf-thresh 0
score clip_es_crf "$RUNS/clip-es-crf" "$TRAIN"

echo "== 5. pseudo-labels on '$TRAIN_AUG', the segmenter, and its score on '$VAL'" >&2
if [ "$TRAIN_AUG" = "$TRAIN" ]; then
  PSEUDO="$RUNS/refine-crf"  # the same images: the full-SSR row's labels are the pseudo-labels
else
  ssr make-seeds --data "$DATA" --split "$TRAIN_AUG" --out "$RUNS/seeds-aug" --cmpa "$RUNS/cmpa" \
    "${CLIP[@]}" "${COMMON[@]}" "${SEEDS_X[@]}"
  refine refine-aug seeds-aug --affinity clip+dino --mask sgc --crf
  PSEUDO="$RUNS/refine-aug"
fi
ssr fit-seg --data "$DATA" --split "$TRAIN_AUG" --pseudo "$PSEUDO" --out "$RUNS/seg" --iters "$SEG_ITERS" \
  --resume "${SEG_MODEL[@]}" "${COMMON[@]}" "${SEG_X[@]}"
ssr predict --model "$RUNS/seg" --data "$DATA" --split "$VAL" --out "$RUNS/pred" "${COMMON[@]}" "${PREDICT_X[@]}"
score seg_val "$RUNS/pred" "$VAL"
ssr predict --model "$RUNS/seg" --data "$DATA" --split "$VAL" --out "$RUNS/pred-crf" --crf \
  "${COMMON[@]}" "${PREDICT_X[@]}"
score seg_val_crf "$RUNS/pred-crf" "$VAL"

echo "== done: run folders under $RUNS; the table is $RUNS/ablation.md" >&2
"$PYTHON" "$HERE/ablation_table.py" "$RUNS/scores" --train-split "$TRAIN" --val-split "$VAL" \
  --out "$RUNS/ablation.md"
