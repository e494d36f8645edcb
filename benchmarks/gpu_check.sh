#!/usr/bin/env bash
# One device call: GPU tests of the kernels and of the wired-up layer, then `apbv run` on one GPU.
# Usage (on the device machine, repo root, wheels in .whl/):  bash benchmarks/gpu_check.sh "$OUT" [--skip-tests]
set -uo pipefail
out="${1:-/tmp/apbv_gpu}"; mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/device.txt"
if [[ "${2:-}" != "--skip-tests" ]]; then
  python3 -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py tests/test_gpu_integration.py 2>&1 \
    | tee "$out/gpu_tests.log" | tail -5
fi
# Whole model on one GPU (W = 1: both zigzag blocks and the passing path on one rank), median of 3 after warm-up.
for n in 128 512; do   # video frames: 32K and 128K tokens
  for args in "apbv.variant=exact" "apbv.variant=apbv" "apbv.variant=star"; do
    torchrun --nproc_per_node 1 -m megatron_apbv run configs/gpu_1x.yaml input.video_frames=$n $args \
      --compare dense --repeat 3 2>&1 | grep '^{' | tee -a "$out/apbv_run.jsonl"
  done
done
python3 benchmarks/profile_layer.py --out "$out/profile_layer.json" 2>&1 | tail -25
