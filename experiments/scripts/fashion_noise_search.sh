#!/usr/bin/env bash
# The held-out searches on the `fashion-cnn-noise40` preset's setting
# (docs/experiments/label-noise-fashion.md): Fashion-MNIST, the small CNN
# without augmentation, a 5k-image subset, 40 epochs, batch 128, cosine schedule; 40 % or
# 20 % symmetric, 30 % pair label noise or clean labels. Every run holds out 20 % of the
# training set, whose labels carry the same noise, and is scored on it; the test set is never
# used. Two ksam processes at a time, one thread each; a grid whose runs are on disk is not run
# again (--resume).
#
#   experiments/scripts/fashion_noise_search.sh          # 40 % symmetric noise
#   experiments/scripts/fashion_noise_search.sh clean    # clean labels
#   experiments/scripts/fashion_noise_search.sh noise20  # 20 % symmetric noise
#   experiments/scripts/fashion_noise_search.sh pair30   # 30 % pair noise (class c becomes c+1 mod 10)
#   experiments/scripts/fashion_noise_search.sh field-pair30  # the rest of the field at 30 % pair noise
#   experiments/scripts/fashion_noise_search.sh memory-stratified  # K-SAM from memory, `stratified`, B/8
#   experiments/scripts/fashion_noise_search.sh memory-split  # ... with the ascent/descent rows split
#   experiments/scripts/fashion_noise_search.sh field-noise40 # ... at 40 % symmetric noise (field-noise20
#                                                    # likewise; field-clean: the noise rules only)
#   OUT=/some/dir KSAM="python -m ksam" experiments/scripts/fashion_noise_search.sh
set -euo pipefail
OUT=${OUT:-runs/fashion-noise-search}
KSAM=${KSAM:-ksam}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
COMMON=(--task fashion-mnist --model cnn --task-option augment=false --train-subset 5000
        --epochs 40 --seeds 2 --eval-every 10 --validation-split 0.2 --quiet)

grid() {  # grid NAME "LR ..." SPEC ...: every spec at every lr of the list
  local name=$1 lrs=$2; shift 2
  local specs=() spec lr
  for spec in "$@"; do
    for lr in $lrs; do
      if [[ $spec == *:* ]]; then specs+=("$spec,lr=$lr"); else specs+=("$spec:lr=$lr"); fi
    done
  done
  local start=$SECONDS
  $KSAM compare "${COMMON[@]}" --methods "${specs[@]}" --out "$OUT/$name" --resume
  echo "$name: $((SECONDS - start)) s wall-clock" | tee -a "$OUT/durations.txt"
}

# field SETTING RHO "SAM-FAMILY LRS" "MSAM LRS" "RULE LRS" [OPTION ...]: the cheap-SAM rivals
# at SAM's held-out rho (MSAM at its authors' 0.3), K-SAM's other noise rules and Ordered SGD
# with `auto`, each on three lrs around its family's choice; one seed each. The grids of one
# setting go to $OUT/SETTING; OPTIONs are that setting's noise.
field() {
  local setting=$1 rho=$2 sam_lrs=$3 msam_lrs=$4 rule_lrs=$5; shift 5
  OUT=$OUT/$setting
  mkdir -p "$OUT"
  COMMON+=("$@" --seeds 1)
  { grid field-sam "$sam_lrs" random-sam:rho="$rho" looksam:rho="$rho" \
      sam-late:rho="$rho" rst:rho="$rho"
    grid field-msam "$msam_lrs" msam:rho=0.3; } &
  { grid field-rules "$rule_lrs" ksam:select=band,rho=0.1 ksam:select=median,rho=0.1 \
      ksam:select=stratified,rho=0.1 osgd:select=auto,estimate=0.1; } &
  wait
}

case ${1:-noise40} in
  clean)
    OUT=$OUT/clean
    mkdir -p "$OUT"
    grid sgd-sam "0.025 0.05 0.1 0.2" sgd sam:rho=0.05 sam:rho=0.1 &
    grid ksam "0.025 0.05 0.1" ksam:rho=0.05 ksam:rho=0.1 ksam:rho=0.1,scores=memory \
      ksam:select=auto,estimate=0.1,rho=0.1 ksam:select=auto,estimate=0.1,rho=0.2 &
    wait
    # most methods were best at 0.025, the grid's smallest lr: 0.0125 beside it; SAF and MESA
    # on the extended grid from the start
    { grid sgd-sam-small "0.0125" sgd sam:rho=0.05 sam:rho=0.1
      grid saf "0.0125 0.025 0.05 0.1" saf; } &
    { grid ksam-small "0.0125" ksam:rho=0.05 ksam:rho=0.1 ksam:rho=0.1,scores=memory \
        ksam:select=auto,estimate=0.1,rho=0.1 ksam:select=auto,estimate=0.1,rho=0.2
      grid mesa "0.0125 0.025 0.05 0.1" mesa; } &
    wait
    # K-SAM from memory was best at 0.0125, now the smallest lr: one step further
    grid memory-small "0.00625" ksam:rho=0.1,scores=memory
    exit 0 ;;
  noise20)
    OUT=$OUT/noise20
    mkdir -p "$OUT"
    COMMON+=(--task-option noisy_validation=true --label-noise 0.2)
    grid sgd-sam "0.0125 0.025 0.05" sgd sam:rho=0.1 sam:rho=0.2 &
    { grid ksam-auto "0.0125 0.025 0.05" ksam:select=auto,estimate=0.1,rho=0.1 \
        ksam:select=auto,estimate=0.1,rho=0.2
      grid ksam-top "0.025 0.05 0.1" ksam:rho=0.1; } &
    wait
    # SGD was best at 0.0125, the grid's smallest lr: 0.00625 beside it; SAF, MESA and K-SAM
    # from memory from 0.00625
    { grid small-lr "0.00625" sgd
      grid saf "0.00625 0.0125 0.025 0.05" saf; } &
    grid memory "0.00625 0.0125 0.025 0.05" mesa ksam:rho=0.1,scores=memory &
    wait
    # SAM and K-SAM auto at rho 0.2 were best at 0.05, the largest lr: one step further
    grid sam-auto-large "0.1" sam:rho=0.2 ksam:select=auto,estimate=0.1,rho=0.2
    exit 0 ;;
  pair30)
    # Centred on the lr and rho the 20 % and 40 % searches chose, one step either side.
    OUT=$OUT/pair30
    mkdir -p "$OUT"
    COMMON+=(--task-option noisy_validation=true --label-noise 0.3
             --task-option label_noise_type=pair)
    { grid sgd-sam "0.00625 0.0125 0.025" sgd saf
      grid sam "0.0125 0.025 0.05" sam:rho=0.1
      grid sam-rho "0.025" sam:rho=0.05 sam:rho=0.2; } &
    { grid ksam-auto "0.0125 0.025 0.05" ksam:select=auto,estimate=0.1,rho=0.1 \
        ksam:select=auto,estimate=0.1,rho=0.2
      grid ksam-top "0.025 0.05 0.1" ksam:rho=0.1
      grid memory "0.00625 0.0125 0.025" mesa ksam:rho=0.1,scores=memory; } &
    wait
    # SGD, SAF and SAM (rho 0.1) were best at the smallest lr, SAM rho 0.2 beat rho 0.1 at lr
    # 0.025 and K-SAM from memory was best at the largest: one step further each
    { grid small-lr "0.003125" sgd saf
      grid sam-small "0.00625" sam:rho=0.1; } &
    { grid sam-rho-0.2 "0.0125 0.05" sam:rho=0.2
      grid memory-large "0.05" ksam:rho=0.1,scores=memory; } &
    wait
    grid sam-rho-0.3 "0.025" sam:rho=0.3  # SAM was best at rho 0.2, the largest tried
    # K-SAM from memory and K-SAM auto at rho 0.2 were best at 0.05, now the largest lr: one
    # step further
    grid memory-larger "0.1" ksam:rho=0.1,scores=memory ksam:select=auto,estimate=0.1,rho=0.2
    exit 0 ;;
  field-pair30)
    field pair30 0.2 "0.0125 0.025 0.05" "0.00625 0.0125 0.025" "0.0125 0.025 0.05" \
      --task-option noisy_validation=true --label-noise 0.3 --task-option label_noise_type=pair
    # one lr further where the best sat at an edge of its grid
    grid field-small "0.00625" random-sam:rho=0.2 sam-late:rho=0.2 rst:rho=0.2 \
      osgd:select=auto,estimate=0.1 &
    grid field-large "0.1" looksam:rho=0.2 ksam:select=band,rho=0.1 \
      ksam:select=median,rho=0.1 &
    wait
    exit 0 ;;
  field-noise40)
    field noise40 0.1 "0.0125 0.025 0.05" "0.00625 0.0125 0.025" "0.0125 0.025 0.05" \
      --task-option noisy_validation=true --label-noise 0.4
    # one lr further where the best sat at an edge of its grid
    grid field-small "0.00625" random-sam:rho=0.1 sam-late:rho=0.1 rst:rho=0.1 \
      osgd:select=auto,estimate=0.1 &
    grid field-large "0.1" looksam:rho=0.1 ksam:select=stratified,rho=0.1 &
    wait
    exit 0 ;;
  field-noise20)
    field noise20 0.1 "0.0125 0.025 0.05" "0.00625 0.0125 0.025" "0.0125 0.025 0.05" \
      --task-option noisy_validation=true --label-noise 0.2
    # one lr further where the best sat at an edge of its grid
    grid field-small "0.00625" random-sam:rho=0.1 sam-late:rho=0.1 rst:rho=0.1 &
    grid field-large "0.1" looksam:rho=0.1 &
    wait
    exit 0 ;;
  memory-stratified)
    # K-SAM from memory with `stratified` at K = B/8 (beside it the same rule with the
    # scoring forward) at all four settings, one seed each; lr 0.025 was best everywhere
    # on 0.025-0.2, so 0.0125 and 0.00625 below it for the memory rule
    COMMON+=(--seeds 1)
    setting() {
      local name=$1; shift
      ( OUT=$OUT/memory-stratified/$name
        COMMON+=("$@")
        mkdir -p "$OUT"
        grid rules "0.025 0.05 0.1 0.2" ksam:select=stratified,scores=memory,k=0.125,rho=0.1 \
          ksam:select=stratified,k=0.125,rho=0.1
        grid memory-small "0.00625 0.0125" ksam:select=stratified,scores=memory,k=0.125,rho=0.1
        # the radius either side of 0.1, and no K warm-up (the larger descent subsets of
        # the first 300 steps)
        grid memory-rho "0.0125 0.025 0.05" \
          ksam:select=stratified,scores=memory,k=0.125,rho=0.05 \
          ksam:select=stratified,scores=memory,k=0.125,rho=0.2 \
          ksam:select=stratified,scores=memory,k=0.125,k_warmup=0,rho=0.1
        # rho 0.05 beat 0.1 at three settings, at the smallest radius (and at 40 % at the
        # largest lr), and rho 0.2 was best at the largest lr: one step further each
        grid memory-rho-small "0.0125 0.025 0.05" \
          ksam:select=stratified,scores=memory,k=0.125,rho=0.025
        grid memory-rho-large "0.1" ksam:select=stratified,scores=memory,k=0.125,rho=0.05
        grid memory-rho-0.2-large "0.1" ksam:select=stratified,scores=memory,k=0.125,rho=0.2 )
    }
    { setting clean
      setting noise20 --task-option noisy_validation=true --label-noise 0.2; } &
    { setting noise40 --task-option noisy_validation=true --label-noise 0.4
      setting pair30 --task-option noisy_validation=true --label-noise 0.3 \
        --task-option label_noise_type=pair; } &
    wait
    # at 40 % rho 0.025 was best, now the smallest radius: one step further
    ( OUT=$OUT/memory-stratified/noise40
      COMMON+=(--task-option noisy_validation=true --label-noise 0.4)
      grid memory-rho-smaller "0.0125 0.025 0.05" \
        ksam:select=stratified,scores=memory,k=0.125,rho=0.0125 )
    exit 0 ;;
  memory-split)
    # K-SAM from memory with `stratified` at each setting's held-out rho and lr 0.025 +- one
    # step, two seeds a cell: the 32 rows of a step split unevenly between the passes (K1 =
    # 8 or 4 ascent rows, K2 = 24, 28 or 16 descent rows), and the K warm-up at 50 steps a
    # halving instead of 100; beside them the even split K1 = K2 = 16 at two seeds
    COMMON+=(--seeds 2)
    split() {  # split SETTING RHO "NEIGHBOUR-RHOS" [OPTION ...]
      local name=$1 rho=$2 neighbours=$3; shift 3
      ( OUT=$OUT/memory-split/$name
        COMMON+=("$@")
        mkdir -p "$OUT"
        local memory=ksam:select=stratified,scores=memory,rho=$rho
        grid split "0.0125 0.025 0.05" "$memory,k=0.125" "$memory,k_ascent=8,k_descent=24" \
          "$memory,k_ascent=4,k_descent=28" "$memory,k_ascent=8,k_descent=16" \
          "$memory,k=0.125,k_warmup=50"
        # K1 = 8, K2 = 24 was best or level at three settings: the radius either side (half
        # and twice the setting's), at lr 0.025, where it was best everywhere
        local around=() r
        for r in $neighbours; do
          around+=("ksam:select=stratified,scores=memory,rho=$r,k_ascent=8,k_descent=24")
        done
        grid "split-rho-${neighbours// /-}" "0.025" "${around[@]}" )
    }
    { split clean 0.05 "0.025 0.1"
      split noise20 0.05 "0.025 0.1" --task-option noisy_validation=true --label-noise 0.2; } &
    { split noise40 0.025 "0.0125 0.05" --task-option noisy_validation=true --label-noise 0.4
      split pair30 0.1 "0.05 0.2" --task-option noisy_validation=true --label-noise 0.3 \
        --task-option label_noise_type=pair; } &
    wait
    # the best radius sat at the grid's edge at 20 % (the smallest) and under pair noise
    # (the largest): one step further
    { split noise20 0.05 "0.0125" --task-option noisy_validation=true --label-noise 0.2; } &
    { split pair30 0.1 "0.4" --task-option noisy_validation=true --label-noise 0.3 \
        --task-option label_noise_type=pair; } &
    wait
    exit 0 ;;
  field-clean)
    # K-SAM's noise rules and Ordered SGD with `auto` only: the clean-label question is
    # whether a noise rule costs accuracy where there is no noise
    OUT=$OUT/clean
    mkdir -p "$OUT"
    COMMON+=(--seeds 1)
    grid field-rules "0.0125 0.025 0.05" ksam:select=band,rho=0.1 ksam:select=median,rho=0.1 \
      ksam:select=stratified,rho=0.1 osgd:select=auto,estimate=0.1
    # one lr further where the best sat at an edge of its grid
    grid field-small "0.00625" ksam:select=median,rho=0.1 osgd:select=auto,estimate=0.1 &
    grid field-large "0.1" ksam:select=stratified,rho=0.1 &
    wait
    exit 0 ;;
esac
COMMON+=(--task-option noisy_validation=true --label-noise 0.4)

# The first grid: lr 0.025-0.2, rho 0.1-0.3 ...
grid sgd-sam "0.025 0.05 0.1 0.2" sgd sam:rho=0.1 sam:rho=0.2 sam:rho=0.3 &
grid ksam "0.025 0.05 0.1 0.2" ksam:rho=0.1 ksam:rho=0.2 ksam:rho=0.3 \
  ksam:select=auto,rho=0.1 ksam:select=auto,rho=0.2 ksam:select=auto,rho=0.3 &
wait
# ... extended where the best value sat at the grid's edge: SGD, SAM (rho 0.1) and K-SAM
# auto at the smallest lr, SAM at the smallest rho.
grid small-lr "0.00625 0.0125" sgd &
grid sam-small "0.0125" sam:rho=0.1 sam:rho=0.05 ksam:select=auto,rho=0.1 \
  ksam:select=auto,rho=0.2 &
wait
grid sam-rho-0.05 "0.025" sam:rho=0.05
