#!/usr/bin/env bash
# One device call for decoding (issue 28), one H100 or H200, about 6-7 minutes (at most ~8 by the step limits):
#   1. GPU tests: the decode kernel (both split combines, head dims 64/80/96/128) against float64, the fused
#      step kernels against torch, fused layers against Megatron's, graphed == eager token for token, batched.
#   2. bench_decode.py (28-layer 7B shape, W = 1): 32K and 128K at batch 1, 32K at batch 8, graphed (64 steps)
#      and eager (8), each against the copy-bandwidth limit; the decode kernel alone next to a copy of the same
#      bytes (kernel_rows); one step under torch.profiler; the checkpoint write + load.
#   3. bench_kernels.py head-dim rows (d 64/80/96/128 x GQA 28/4, 16/2 at 32K): each route's TFLOP/s, the
#      routed one judged against the best, and the route table rebuilt from them.
# Usage (device machine, repo root, wheels in .whl/):  bash benchmarks/gpu_decode.sh "$OUT"
# $OUT: decode_gpu.json, kernels_gpu.json, attention_routes_measured.json, profile_step_*.txt, *.log, steps.txt.
set -uo pipefail
out="${1:-/tmp/apbv_decode_out}"; mkdir -p "$out"
scratch=$(mktemp -d); steps_file="$out/steps.txt"; t_start=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD:/tmp/site" PATH="/tmp/site/bin:$PATH" PYTHONUNBUFFERED=1
source "$(dirname "$0")/gpu_step.sh"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/device.txt"
keep() { cp -f "$scratch/$1.log" "$out/" 2>/dev/null; }

step gpu_tests 120 python3 -m pytest -q -p no:cacheprovider --tb=short -rs tests/test_decode_gpu.py
keep gpu_tests
step bench_decode 220 torchrun --nproc_per_node 1 benchmarks/bench_decode.py configs/qwen25vl_7b_lm.yaml \
  --out "$out/decode_gpu.json" --profile-dir "$out" --steps 64 --eager-steps 8
keep bench_decode
step bench_kernels 140 python3 benchmarks/bench_kernels.py --no-tests --lengths "" --crossover "" \
  --head-dims 96,80,64,128 --out "$out/kernels_gpu.json" --routes-out "$out/attention_routes_measured.json"
keep bench_kernels
echo "total $(( $(date +%s) - t_start ))s" | tee -a "$steps_file"
pack_out "$out" steps.txt device.txt decode_gpu.json kernels_gpu.json attention_routes_measured.json
exit 0
