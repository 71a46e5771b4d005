#!/usr/bin/env bash
# The GPU check for a session lent a device (one prepared script, see docs/benchmarks.md):
# the fast-path tests on CUDA, then the step-cost benchmark, figures into $OUT (or ./gpu-out).
# Usage on the device machine, from the repository root:
#   PYTHONPATH=src bash benchmarks/gpu_check.sh
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONPATH=${PYTHONPATH:-src} PYTHONUNBUFFERED=1
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee "$out/env.txt"
timeout 240 python3 -m pytest -q tests/test_fast_cuda.py 2>&1 | tee "$out/fast_cuda_tests.txt"
timeout 420 python3 -m ksam bench --device cuda --steps 30 --warmup 5 \
    --json "$out/bench.json" 2>&1 | tee "$out/bench.md"
