#!/usr/bin/env bash
# The cheap screen of K-SAM selection rules for the default (docs/experiments/default-rule.md): every
# candidate rule at the preset's lr and rho, 2 seeds, trained on 80 % of the training set
# and scored on the held-out 20 % (clean labels), at five label settings of both data sets.
#
#   benchmarks/default_screen.sh mnist1d [SETTING..] # MNIST-1D: clean n5 n20 n40 pair30
#   benchmarks/default_screen.sh fashion SETTING..  # Fashion-MNIST: clean n5 n20 n40 pair30
#   PYTHONPATH=src OUT=/some/dir benchmarks/default_screen.sh ...
set -euo pipefail
OUT=${OUT:-runs/default-screen}
KSAM=${KSAM:-python benchmarks/default_candidates.py}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
RULES=(top auto stratified auto-either fit-either confident aum sample increase)
# On Fashion-MNIST only the rules within 5 points of the better of SGD and SAM on clean
# MNIST-1D (the others are out of the confirmation whatever Fashion-MNIST says).
FASHION_RULES=(top auto stratified auto-either confident sample)
SEEDS=${SEEDS:-2}

noise_flags() {  # noise_flags SETTING -> the --label-noise flags of a setting
  case $1 in
    clean) ;;
    n5) echo "--label-noise 0.05" ;;
    n20) echo "--label-noise 0.2" ;;
    n40) echo "--label-noise 0.4" ;;
    pair30) echo "--label-noise 0.3 --task-option label_noise_type=pair" ;;
    *) echo "unknown setting $1" >&2; exit 2 ;;
  esac
}

run() {  # run NAME ARGS...
  local name=$1; shift
  local start=$SECONDS
  mkdir -p "$OUT"
  $KSAM compare --validation-split 0.2 --seeds "$SEEDS" --quiet --resume "$@" \
    --out "$OUT/$name"
  echo "$name: $((SECONDS - start)) s wall-clock" | tee -a "$OUT/durations.txt"
}

case ${1:-} in
  mnist1d)
    shift
    [[ $# -gt 0 ]] || set -- clean n5 n20 n40 pair30
    for setting in "$@"; do
      specs=(sgd:lr=0.1 sam:rho=0.02,lr=0.1)
      for r in "${RULES[@]}"; do specs+=("ksam:k=32,rho=0.02,select=$r,lr=0.1"); done
      # shellcheck disable=SC2046
      run "mnist1d-$setting" --task mnist1d --epochs 30 --batch-size 128 \
        $(noise_flags "$setting") --methods "${specs[@]}"
    done ;;
  fashion)
    shift
    for setting in "$@"; do
      # SGD's and SAM's lr and rho: the fashion-cnn presets' (n5 takes the clean one's).
      case $setting in
        clean|n5) specs=(sgd:lr=0.025 sam:rho=0.1,lr=0.05) ;;
        n20|n40) specs=(sgd:lr=0.0125 sam:rho=0.1,lr=0.025) ;;
        pair30) specs=(sgd:lr=0.00625 sam:rho=0.2,lr=0.025) ;;
      esac
      for r in "${FASHION_RULES[@]}"; do specs+=("ksam:k=32,rho=0.1,select=$r,lr=0.025"); done
      # shellcheck disable=SC2046
      run "fashion-$setting" --task fashion-mnist --model cnn --train-subset 5000 \
        --epochs 40 --batch-size 128 --task-option augment=false \
        $(noise_flags "$setting") --methods "${specs[@]}"
    done ;;
  *) echo "usage: $0 mnist1d | fashion SETTING..." >&2; exit 2 ;;
esac
