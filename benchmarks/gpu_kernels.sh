#!/usr/bin/env bash
# Issue 16 on one GPU: GPU tests of every attention route, bench_kernels (ours vs every SDPA backend),
# and apbv bench --level e2e for Qwen2.5-VL-3B/7B at 1440p and 720p.
# Usage (device machine, repo root, wheels in .whl/):  bash benchmarks/gpu_kernels.sh "$OUT" [all|kernels|e2e]
#   kernels: tests + bench_kernels, about 6 minutes (H200: tests 90 s, bench ~300 s)
#   e2e:     the four e2e runs, about 4 minutes (H200: 80 + 65 + 38 + 33 s)
#   all:     both, about 10 minutes
set -uo pipefail
out="${1:-/tmp/apbv_gpu_kernels}"; part="${2:-all}"; mkdir -p "$out"
scratch=$(mktemp -d); t_start=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$scratch/device.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cudnn', torch.backends.cudnn.version(), 'transformers', transformers.__version__)" | tee -a "$scratch/device.txt"
python3 -c "import av; print('av', av.__version__)" >> "$scratch/device.txt" 2>&1 || true
python3 -c "import flash_attn; print('flash_attn', flash_attn.__version__)" >> "$scratch/device.txt" 2>&1 || true

steps_file="$scratch/steps.txt"
source "$(dirname "$0")/gpu_step.sh"

if [[ $part != e2e ]]; then
step gpu_tests 150 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_kernels_gpu.py tests/test_gpu_integration.py tests/test_vision_attention.py::test_batched_tower_matches_transformers_tower_gpu
cp "$scratch/gpu_tests.log" "$out/gpu_tests.log"
step bench_kernels 420 python3 benchmarks/bench_kernels.py --no-tests --out "$out/kernels_h200.json"
fi
if [[ $part != kernels ]]; then
for model in 7b 3b; do
  step "e2e_${model}_1440p" 150 torchrun --nproc_per_node 1 -m megatron_apbv bench "configs/qwen25vl_${model}_e2e.yaml" \
    --level e2e --source-size 1440x2560 --warmup 1 --repeat 1 --out "$scratch/e2e"
done
for model in 7b 3b; do
  step "e2e_${model}_720p" 100 torchrun --nproc_per_node 1 -m megatron_apbv bench "configs/qwen25vl_${model}_e2e.yaml" \
    input.frame_size=[728,1288] --level e2e --source-size 720x1280 --warmup 1 --repeat 1 --out "$scratch/e2e"
done
cp "$scratch/e2e/e2e.jsonl" "$out/e2e_h200.jsonl" 2>/dev/null
fi
echo "total $(( $(date +%s) - t_start ))s" | tee -a "$scratch/steps.txt"
cp "$scratch/steps.txt" "$scratch/device.txt" "$out/"
tar -czf "$out/logs.tgz" -C "$scratch" --exclude='*.mp4' .
