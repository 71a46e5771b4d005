#!/usr/bin/env bash
# The held-out searches for SAF, MESA and K-SAM from memory: their rows of `mnist1d-lr` and
# `mnist1d-noise30` (docs/experiments/results.md), and their lr on the setting of
# `fashion-cnn-noise40` (docs/experiments/label-noise-fashion.md). Every run holds out 20 %
# of the training set (labels with the preset's noise) and is scored on it; the test set is
# never used. K-SAM from memory runs at the K and rho of the preset's K-SAM row, so the two
# differ only by where the scores come from; MESA's EMA decay is searched beside its lr (the
# reference's 0.9998 averages over ~5000 steps, longer than these runs).
#
#   experiments/scripts/memory_search.sh mnist1d     # clean MNIST-1D, 30 epochs, 3 seeds
#   experiments/scripts/memory_search.sh noise30     # MNIST-1D, 30 % noise, 80 epochs, 2 seeds
#   experiments/scripts/memory_search.sh fashion40   # Fashion-MNIST 5k, 40 % noise, 40 epochs, 2 seeds
#   OUT=/some/dir KSAM="python -m ksam" experiments/scripts/memory_search.sh fashion40
set -euo pipefail
OUT=${OUT:-runs/memory-search}
KSAM=${KSAM:-ksam}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"

grid() {  # grid NAME "LR ..." "SPEC ..." COMPARE-ARGS...: every spec at every lr
  local name=$1 lrs=$2 spec lr specs=()
  for spec in $3; do
    for lr in $lrs; do
      if [[ $spec == *:* ]]; then specs+=("$spec,lr=$lr"); else specs+=("$spec:lr=$lr"); fi
    done
  done
  shift 3
  local start=$SECONDS
  $KSAM compare "$@" --validation-split 0.2 --quiet --methods "${specs[@]}" \
    --out "$OUT/$name"
  echo "$name: $((SECONDS - start)) s wall-clock" | tee -a "$OUT/durations.txt"
}

MESA="mesa mesa:decay=0.999 mesa:decay=0.99"
NOISE30=(--task mnist1d --label-noise 0.3 --epochs 80 --seeds 2)
FASHION40=(--task fashion-mnist --model cnn --task-option augment=false
           --task-option noisy_validation=true --train-subset 5000 --label-noise 0.4
           --epochs 40 --seeds 2 --eval-every 10)
case ${1:?give mnist1d, noise30 or fashion40} in
  mnist1d)
    grid mnist1d "0.05 0.1 0.2 0.4" "saf $MESA ksam:k=32,rho=0.02,scores=memory" \
      --task mnist1d --epochs 30 --seeds 3 ;;
  noise30)
    grid noise30 "0.05 0.1 0.2 0.4" "saf $MESA ksam:k=32,rho=0.05,scores=memory" \
      "${NOISE30[@]}"
    # SAF and MESA were best at the grid's largest lr: larger ones
    grid noise30-large-lr "0.6 0.8" "saf mesa" "${NOISE30[@]}" ;;
  fashion40)
    grid fashion40 "0.0125 0.025 0.05 0.1" \
      "saf mesa mesa:decay=0.99 ksam:rho=0.1,scores=memory" "${FASHION40[@]}"
    # all three were best at the grid's smallest lr: a smaller one
    grid fashion40-small-lr "0.00625" "saf mesa ksam:rho=0.1,scores=memory" "${FASHION40[@]}" ;;
  *) echo "unknown search: $1" >&2; exit 2 ;;
esac
