#!/usr/bin/env bash
# K-SAM from memory with `stratified` on MNIST-1D's label-noise settings
# (docs/experiments/label-noise-memory.md): the MNIST-1D CNN, 30 epochs, batch 128, clean
# labels, 20 % and 40 % symmetric and 30 % pair noise. Per setting two commands, as for the full grid: the first sweeps the
# lr on a held-out 20 % of the training set whose labels carry the same noise (seed 0) and
# runs seed 0 at the chosen lr on the test set; the second adds seeds 1-4 at the chosen lrs.
# Specs: the 32 rows of a step split evenly (K1 = K2 = 16, B/8 each) or unevenly (K1 = 8
# ascent rows, K2 = 24 descent rows), each at rho 0.01, 0.02 (the grid's K-SAM radius) and
# 0.05. Two ksam processes at a time, one thread each; finished runs are kept (--resume).
#
#   experiments/scripts/mnist1d_memory_search.sh
#   OUT=/some/dir KSAM="python -m ksam" experiments/scripts/mnist1d_memory_search.sh
set -euo pipefail
OUT=${OUT:-runs/mnist1d-memory-search}
KSAM=${KSAM:-ksam}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
SUFFIX=""
SPECS=()
for rho in 0.01 0.02 0.05; do
  SPECS+=("ksam:k=16,rho=$rho,select=stratified,scores=memory"
          "ksam:k_ascent=8,k_descent=24,rho=$rho,select=stratified,scores=memory")
done

setting() {  # setting NAME [NOISE OPTION ...]
  local name=$1; shift
  local out=$OUT/$name$SUFFIX start=$SECONDS
  $KSAM compare "$@" --epochs 30 --seeds 1 --lr-sweep 0.025 0.05 0.1 0.2 \
    --validation-split 0.2 --methods "${SPECS[@]}" --out "$out" --resume --quiet
  local chosen
  chosen=$(python3 -c "import json, sys; print(' '.join(json.load(open(sys.argv[1]))['specs']))" \
    "$out/lr_sweep.json")
  # shellcheck disable=SC2086  # one word per chosen spec
  $KSAM compare "$@" --epochs 30 --seeds 5 --methods $chosen --out "$out" --resume --quiet
  echo "$name$SUFFIX: $((SECONDS - start)) s wall-clock" | tee -a "$OUT/durations.txt"
}

{ setting n0
  setting n20 --label-noise 0.2 --task-option noisy_validation=true; } &
{ setting n40 --label-noise 0.4 --task-option noisy_validation=true
  setting pair30 --label-noise 0.3 --task-option label_noise_type=pair \
    --task-option noisy_validation=true; } &
wait
# 8 / 24 at rho 0.01, the smallest radius, was chosen at 20 %, 40 % and pair noise: one
# step further there (out dirs NAME-rho0.005)
SUFFIX=-rho0.005
SPECS=("ksam:k_ascent=8,k_descent=24,rho=0.005,select=stratified,scores=memory")
{ setting n20 --label-noise 0.2 --task-option noisy_validation=true
  setting n40 --label-noise 0.4 --task-option noisy_validation=true; } &
{ setting pair30 --label-noise 0.3 --task-option label_noise_type=pair \
    --task-option noisy_validation=true; } &
wait
# ... and at rho 0.05, the largest, 8 / 24 on clean labels and 16 / 16 at 40 %: rho 0.1
SUFFIX=-rho0.1
SPECS=("ksam:k_ascent=8,k_descent=24,rho=0.1,select=stratified,scores=memory")
setting n0 &
SPECS=("ksam:k=16,rho=0.1,select=stratified,scores=memory")
setting n40 --label-noise 0.4 --task-option noisy_validation=true &
wait
