#!/usr/bin/env bash
# The GPU check for a session lent a device (prepared script, see docs/experiments/benchmarks.md), figures
# into $OUT (or ./gpu-out). Two parts, each under the device tool's 600 s per command:
#   part 1: the CUDA fast-path tests, the two cases with targets (ResNet-18 b128, WRN-16-8
#           b512; fp32/bf16 x eager/fast), and torch.compile + fast path on ResNet-18 b128 bf16;
#   part 2: the other cases (ResNet-18 b512, WRN-16-8 b128, BERT-base 32x128).
# Each benchmark has its own timeout, so a slow one loses only itself; rows are printed (and
# kept) as they are measured.
# Usage on the device machine, from the repository root:
#   PYTHONPATH=src bash benchmarks/gpu_check.sh 1     # then, if time is left: ... 2
set -uo pipefail
part=${1:-1}
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONPATH=${PYTHONPATH:-src} PYTHONUNBUFFERED=1

bench() {  # bench NAME TIMEOUT ARGS...
    local name=$1 limit=$2
    shift 2
    timeout "$limit" python3 -m ksam bench --device cuda --steps 20 --warmup 5 --profile \
        --json "$out/bench-$name.json" "$@" 2>&1 | grep -v "^USDT\|^STAGE" \
        | tee "$out/bench-$name.md"
}

python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" \
    | tee "$out/env-$part.txt"
if [ "$part" = 1 ]; then
    timeout 150 python3 -m pytest -q -x tests/library/test_fast_cuda.py 2>&1 | tail -30 \
        | tee "$out/fast_cuda_tests.txt"
    bench resnet18-b128 120 --cases resnet18-b128
    bench wrn16-8-b512 150 --cases wrn16-8-b512
    bench resnet18-b128-compile 150 --cases resnet18-b128 --precision bf16 --mode fast \
        --methods ksam sam --compile
else
    for case in resnet18-b512 wrn16-8-b128 bert-base-32x128; do
        bench "$case" 150 --cases "$case"
    done
fi
