#!/usr/bin/env bash
# Reproduce docs/experiments/results.md: the rho sweep and the presets, one ksam process at a time.
#
#   experiments/scripts/run_presets.sh            # CPU: rho and lr sweeps + mnist1d, mnist1d-lr,
#                                        #      mnist1d-noise30 (its search:
#                                        #      experiments/scripts/noise_search.sh)
#   experiments/scripts/run_presets.sh gpu        # GPU: fashion-mnist-gpu, -5k, -10k, -noise
#   OUT=/some/dir experiments/scripts/run_presets.sh
#
# CPU timings in docs/experiments/results.md were taken with one thread (OMP_NUM_THREADS=1).
set -euo pipefail
OUT=${OUT:-runs/presets}
KSAM=${KSAM:-ksam}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"

run() {  # run NAME ARGS...: time one command, copy its plot next to the others
  local name=$1; shift
  local start=$SECONDS
  "$KSAM" compare "$@" --quiet --out "$OUT/$name"
  echo "$name: $((SECONDS - start)) s wall-clock" | tee -a "$OUT/durations.txt"
  if [[ -f "$OUT/$name/accuracy_vs_time.png" ]]; then
    cp "$OUT/$name/accuracy_vs_time.png" "$OUT/$name.png"
  fi
}

if [[ ${1:-cpu} == gpu ]]; then
  for preset in fashion-mnist-gpu fashion-mnist-5k fashion-mnist-10k fashion-mnist-noise; do
    run "$preset" --preset "$preset"
  done
  exit 0
fi

# rho for the MNIST-1D presets: held-out 20 % of the training set, never the test set.
run sweep-mnist1d --task mnist1d --validation-split 0.2 --seeds 2 --epochs 20 \
  --methods sgd sam:rho=0.02 sam:rho=0.05 sam:rho=0.1 sam:rho=0.2 \
  ksam-plain:k=32,rho=0.02 ksam-plain:k=32,rho=0.05 ksam-plain:k=32,rho=0.1 \
  ksam-plain:k=32,rho=0.2

# lr per method for the mnist1d-lr preset: the same held-out split, 30 epochs, 3 seeds.
for lr in 0.05 0.1 0.2 0.4; do
  run "lr-sweep-$lr" --task mnist1d --validation-split 0.2 --seeds 3 --epochs 30 --lr "$lr" \
    --methods sgd sam:rho=0.02 ksam:k=32,rho=0.02 ksam:k=32,rho=0.02,rescale=0.5 \
    osgd:k=32,k_warmup=100
done

for preset in mnist1d mnist1d-lr mnist1d-noise30; do
  run "$preset" --preset "$preset"
done
