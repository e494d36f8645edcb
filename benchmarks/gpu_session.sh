#!/usr/bin/env bash
# One device call (at most ~10 minutes) of the session's GPU work, by part:
#   check: every GPU test, our vision tower against transformers' (bench_vision), decoding (bench_decode), kernel routes
#   jobs:  the job benchmark (serial vs pipelined, bench_jobs), then decoding (bench_decode) in the time left
#   all:   in one call, shorter limits: every GPU test, bench_vision, bench_jobs
#   wheel: the installed wheel on the GPU image, run from an empty folder
# Usage (device machine, repo root, wheels in .whl/, the project's wheel in .whl/apbv/ for `wheel`):
#   bash benchmarks/gpu_session.sh "$OUT" [check|jobs|wheel]
set -uo pipefail
out="${1:-/tmp/apbv_gpu_session}"; part="${2:-check}"; mkdir -p "$out"
scratch=$(mktemp -d); t_start=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/device.txt"
steps_file="$out/steps.txt"
source "$(dirname "$0")/gpu_step.sh"
if [[ $part == wheel ]]; then
  # The wheel as users install it on the GPU image: its own folder, run from an empty one (no repository on the path).
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/apbv_wheel .whl/apbv/*.whl || exit 1
  (mkdir -p /tmp/empty && cd /tmp/empty && export PYTHONPATH=/tmp/apbv_wheel:/tmp/site PYTHONUNBUFFERED=1 &&
   step wheel_examples 60 python3 -m megatron_apbv config --examples ex &&
   printf '{"id": "a", "input.video_frames": 8}\n{"id": "b", "input.video_frames": 16, "generate.max_new_tokens": 4}\n' > req.jsonl &&
   step wheel_infer_gpu 180 torchrun --nproc_per_node 1 -m megatron_apbv infer ex/tiny_cpu.yaml \
     parallel.context_parallel_size=1 device=cuda --requests req.jsonl --output ans.jsonl --quiet &&
   cp ans.jsonl "$out/wheel_infer_answers.jsonl"; python3 -c "import megatron_apbv, sys; print(megatron_apbv.__file__)" >> "$out/steps.txt")
elif [[ $part == check ]]; then
  # The parts (about 9 minutes): GPU tests, our vision tower against transformers', decoding, kernel routes.
  export PYTHONPATH="$PWD:/tmp/site" PATH="/tmp/site/bin:$PATH" PYTHONUNBUFFERED=1
  step gpu_tests 150 python3 -m pytest -q -p no:cacheprovider --tb=short -rs tests/test_decode_gpu.py \
    tests/test_kernels_gpu.py tests/test_gpu_integration.py tests/test_vision_tower.py tests/test_vision_attention.py
  cp "$scratch/gpu_tests.log" "$out/gpu_tests.log"
  step bench_vision 90 python3 benchmarks/bench_vision.py --out "$out" --repeat 2 --budget 30
  cp "$scratch/bench_vision.log" "$out/bench_vision.log"
  step bench_decode 190 torchrun --nproc_per_node 1 benchmarks/bench_decode.py configs/qwen25vl_7b_lm.yaml \
    --out "$out/decode_gpu.json" --profile-dir "$out" --steps 64 --eager-steps 8 --skip-checkpoint
  cp "$scratch/bench_decode.log" "$out/bench_decode.log"
  step bench_kernels 120 python3 benchmarks/bench_kernels.py --no-tests --lengths "" --crossover "" \
    --head-dims 96,80,64,128 --out "$out/kernels_gpu.json" --routes-out "$out/attention_routes_measured.json"
  cp "$scratch/bench_kernels.log" "$out/bench_kernels.log"
elif [[ $part == all ]]; then
  # One call for the job (about 10 minutes): decode and vision GPU tests, the job benchmark, the vision tower.
  export PYTHONPATH="$PWD:/tmp/site" PATH="/tmp/site/bin:$PATH" PYTHONUNBUFFERED=1
  step gpu_tests 100 python3 -m pytest -q -p no:cacheprovider --tb=short -rs tests/test_decode_gpu.py \
    tests/test_vision_tower.py tests/test_vision_attention.py
  cp "$scratch/gpu_tests.log" "$out/gpu_tests.log"
  step bench_jobs 390 python3 benchmarks/bench_jobs.py --out "$out/jobs_gpu.json"
  cp "$scratch/bench_jobs.log" "$out/bench_jobs.log"
  step bench_vision 75 python3 benchmarks/bench_vision.py --out "$out" --repeat 2 --budget 20
  cp "$scratch/bench_vision.log" "$out/bench_vision.log"
else
  # The job benchmark, then decoding in what is left of the call (its rows are in the log as they come).
  export PYTHONPATH="$PWD:/tmp/site" PATH="/tmp/site/bin:$PATH" PYTHONUNBUFFERED=1
  step bench_jobs 400 python3 benchmarks/bench_jobs.py --out "$out/jobs_gpu.json"
  cp "$scratch/bench_jobs.log" "$out/bench_jobs.log"
  left=$(( 570 - ($(date +%s) - t_start) ))
  if (( left > 60 )); then
    step bench_decode "$left" torchrun --nproc_per_node 1 benchmarks/bench_decode.py configs/qwen25vl_7b_lm.yaml \
      --out "$out/decode_gpu.json" --profile-dir "$out" --steps 48 --eager-steps 4 --skip-checkpoint
    cp "$scratch/bench_decode.log" "$out/bench_decode.log"
  fi
fi
echo "total $(( $(date +%s) - t_start ))s" | tee -a "$out/steps.txt"
pack_out "$out" steps.txt device.txt vision_gpu.json decode_gpu.json kernels_gpu.json attention_routes_measured.json jobs_gpu.json
